"""Building, loading and snapshotting causal language models (always Hugging Face directories)."""

import hashlib
import json
import os
import struct
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import torch
from pydantic import Field, model_validator

from latentlab.common.config import Config
from latentlab.common.errors import InputError
from latentlab.common.inputs import missing_model_files
from latentlab.lm.tokenizer import INJECT, PAD, add_special_token, ensure_pad_token

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

# transformers is imported inside the functions that use it: it takes seconds, and the params
# schema (which needs TinyLMConfig) is loaded by every stage, also those that never touch a model.

MANIFEST = "latentlab.json"  # provenance written beside every model we save
SKIP_VERIFY = "LATENTLAB_SKIP_VERIFY"  # =1: loaders do not check a directory against its manifest's content hash


class TinyLMConfig(Config):
    arch: Literal["llama", "qwen2"] = "llama"
    """Transformer family (both are plain decoder-only models in transformers)."""
    hidden_size: int = Field(128, gt=0)
    """Residual stream width H."""
    layers: int = Field(4, gt=0)
    """Number of decoder blocks."""
    heads: int = Field(4, gt=0)
    """Attention heads (H must divide evenly)."""
    kv_heads: int | None = Field(None, gt=0)
    """Key/value heads for grouped-query attention (null: same as heads)."""
    intermediate_size: int = Field(512, gt=0)
    """Width of the MLP inside each block."""
    max_positions: int = Field(128, gt=0)
    """Longest sequence the model is built for."""

    @model_validator(mode="after")
    def _heads_divide(self):
        if self.hidden_size % self.heads:
            raise ValueError(f"hidden_size ({self.hidden_size}) must be divisible by heads ({self.heads})")
        if self.heads % (self.kv_heads or self.heads):
            raise ValueError(f"heads ({self.heads}) must be divisible by kv_heads ({self.kv_heads})")
        return self


def build_tiny_lm(cfg: TinyLMConfig, tokenizer: "PreTrainedTokenizerBase") -> "PreTrainedModel":
    """A randomly initialised decoder-only model sized by `cfg`, with the tokenizer's vocabulary."""
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

    config_class = {"llama": LlamaConfig, "qwen2": Qwen2Config}[cfg.arch]
    config = config_class(
        vocab_size=len(tokenizer),
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.layers,
        num_attention_heads=cfg.heads,
        num_key_value_heads=cfg.kv_heads or cfg.heads,
        max_position_embeddings=cfg.max_positions,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
        tie_word_embeddings=True,
    )
    return AutoModelForCausalLM.from_config(config)


def load_tokenizer(path: str | Path, revision: str | None = None):
    """The tokenizer saved at `path` (a directory or a hub id), of the class its tokenizer_config.json names.
    AutoTokenizer alone may pick the class of config.json's model type instead (transformers 5 does for `qwen2`:
    Qwen2Tokenizer, whose own pipeline drops the scratch character tokenizer's newlines), so a generic fast
    tokenizer is loaded as itself."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    config = Path(path) / "tokenizer_config.json"
    named = json.loads(config.read_text()).get("tokenizer_class") if config.is_file() else None
    if named in ("TokenizersBackend", "PreTrainedTokenizerFast"):
        return PreTrainedTokenizerFast.from_pretrained(path)
    return AutoTokenizer.from_pretrained(path, revision=revision)


def load_lm(
    path: str | Path,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
    revision: str | None = None,
    verify: bool = True,
):
    """(model, tokenizer) from a Hugging Face id or directory; the tokenizer pads on the left, with a pad token
    always (`ensure_pad`: a checkpoint without one, as Llama 3 and GPT-2, gets a spare special token or eos).

    A directory with a manifest is first checked against the content hash the manifest records
    (`verify_manifest`; `verify=False` or LATENTLAB_SKIP_VERIFY=1 skips it); a weight file safetensors
    cannot read stops the load with an InputError naming it.
    """
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM

    path = str(path)
    if Path(path).exists():
        if problem := missing_model_files(Path(path)):
            raise FileNotFoundError(f"{path} is not a Hugging Face model directory: {problem}")
        verify_manifest(path, verify)
    elif path.startswith((".", "/", "~")) or path.count("/") > 1:
        raise FileNotFoundError(f"{path}: no such model directory")
    try:
        tokenizer = load_tokenizer(path, revision)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype or torch.float32, revision=revision)
    except SafetensorError as error:
        damaged = damaged_safetensors(path) if Path(path).is_dir() else None
        where = Path(path) / damaged[0] if damaged else path
        raise InputError(
            f"{where}: the file is damaged ({damaged[1] if damaged else error}): "
            "rerun the stage that wrote it, or restore it with `dvc checkout`"
        ) from None
    except (OSError, ValueError) as error:  # not a directory here, and the hub cannot serve it
        if Path(path).exists():
            raise
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise FileNotFoundError(
            f"{path}: no such directory, and not a Hugging Face hub id that could be loaded ({reason})"
        ) from None
    ensure_pad(model, tokenizer)
    tokenizer.padding_side = "left"
    return model.to(device).eval(), tokenizer


def stop_token_ids(model: "PreTrainedModel", tokenizer: "PreTrainedTokenizerBase", *extra: int) -> list[int]:
    """The ids that end a completion: the tokenizer's eos, then every id of the model's generation config's
    `eos_token_id` (an int or a list: Qwen2.5-Instruct [151645, 151643], Llama 3 Instruct [128001, 128008,
    128009], whose chat turns end in <|eot_id|>), then `extra` (a prompt format's end of turn), each once, in
    that order."""
    ids = [tokenizer.eos_token_id]
    generation = getattr(model, "generation_config", None)
    listed = getattr(generation, "eos_token_id", None)
    ids += listed if isinstance(listed, list | tuple) else [listed]
    ids += extra
    return list(dict.fromkeys(int(i) for i in ids if i is not None))


def ensure_pad(model: "PreTrainedModel", tokenizer: "PreTrainedTokenizerBase") -> None:
    """A pad token for a tokenizer without one, never a token the model must emit where a spare special token
    exists (`tokenizer.ensure_pad_token`), and the model's config told of it when it names none."""
    rows = model.get_input_embeddings().num_embeddings
    ensure_pad_token(tokenizer, rows, stop_token_ids(model, tokenizer))
    if getattr(model.config, "pad_token_id", None) is None and tokenizer.pad_token_id is not None:
        model.config.pad_token_id = tokenizer.pad_token_id


def prepare_pretrained(model: "PreTrainedModel", tokenizer: "PreTrainedTokenizerBase") -> None:
    """Give a hub model what the pipeline relies on: a pad token and the `<INJECT>` slot, its special tokens
    kept (`add_special_token`) and its vocabulary never shrunk: a padded embedding matrix (Qwen's 151,936 rows
    for 151,669 tokens) grows only when the tokenizer outgrows it; each new token's row (input embeddings, and
    the lm_head where it is not tied) is the mean of the existing tokens' rows."""
    ensure_pad(model, tokenizer)
    if tokenizer.pad_token is None:  # no eos, bos or unk either: a pad token of its own
        add_new_tokens(model, tokenizer, PAD)
        tokenizer.pad_token = PAD
    add_new_tokens(model, tokenizer, INJECT)
    model.config.pad_token_id = tokenizer.pad_token_id
    tokenizer.padding_side = "left"


def add_new_tokens(model: "PreTrainedModel", tokenizer: "PreTrainedTokenizerBase", *tokens: str) -> None:
    """Add `tokens` as special tokens the tokenizer lacks; give each a row initialised to the mean of the rows
    of the tokens before it (growing the embeddings only when len(tokenizer) exceeds their rows)."""
    before = len(tokenizer)
    for token in tokens:
        add_special_token(tokenizer, token)
    after = len(tokenizer)
    if after == before:
        return
    rows = model.get_input_embeddings().num_embeddings
    if after > rows:
        model.resize_token_embeddings(after, mean_resizing=False)
    used = min(before, rows)  # the rows of real tokens; a padded matrix's spare rows beyond them are not
    matrices = [model.get_input_embeddings().weight]
    output = model.get_output_embeddings()
    if output is not None and output.weight is not matrices[0]:  # untied lm_head
        matrices.append(output.weight)
    with torch.no_grad():
        for weight in matrices:
            weight[used:after] = weight[:used].float().mean(0).to(weight.dtype)


def hashed_files(directory: str | Path) -> list[Path]:
    """The files the content hash covers: every weight and config file of the directory (the manifest aside)."""
    return [
        file
        for file in sorted(Path(directory).iterdir())
        if file.suffix in {".safetensors", ".json"} and file.name != MANIFEST
    ]


def content_hash(directory: str | Path, files: list[Path] | None = None) -> str:
    """sha256 over the model directory's weight and config files (or `files` of it), in name order: each file's
    name (its path in the directory), then its bytes."""
    digest = hashlib.sha256()
    buffer = bytearray(1 << 22)  # read in 4 MiB pieces into one buffer: no whole file in memory, no new allocations
    view = memoryview(buffer)
    for file in hashed_files(directory) if files is None else files:
        digest.update(file.relative_to(directory).as_posix().encode())
        with file.open("rb", buffering=0) as handle:
            while read := handle.readinto(buffer):
                digest.update(view[:read])
    return digest.hexdigest()


def verify_manifest(directory: str | Path, verify: bool = True) -> None:
    """Check a saved directory against the content hash its manifest records: a file changed or damaged since
    it was written (a corrupted DVC cache object, a half-copied directory) stops the caller with an InputError
    naming the directory, the damaged file where it can tell, and how to restore it. Nothing to check without a
    manifest (a hub snapshot); `verify=False` or LATENTLAB_SKIP_VERIFY=1 skips it (hashing reads every byte once,
    about 2 GB/s: seconds for a model of several GB)."""
    directory = Path(directory)
    if not verify or os.environ.get(SKIP_VERIFY, "") not in ("", "0") or not (directory / MANIFEST).exists():
        return
    expected = read_manifest(directory).get("content_sha256")
    if not expected:
        return
    found = content_hash(directory)
    if found == expected:
        return
    damaged = damaged_safetensors(directory)
    files = ", ".join(file.name for file in hashed_files(directory))
    detail = f"{damaged[0]} is {damaged[1]}" if damaged else f"one of {files} changed since it was saved"
    raise InputError(
        f"{directory} does not match the content hash its {MANIFEST} records "
        f"({expected[:12]}…, found {found[:12]}…; {detail}): rerun the stage that wrote it, or restore it from "
        f"the DVC cache or remote (`dvc checkout --relink {directory}`, `dvc pull {directory}`)"
    )


def damaged_safetensors(directory: str | Path) -> tuple[str, str] | None:
    """(file name, what is wrong) for the first .safetensors file of `directory` whose layout is broken: shorter
    or longer than its header says, or a header that does not parse; None when every one is whole (a changed
    byte inside the data shows only in the content hash)."""
    for file in sorted(Path(directory).glob("*.safetensors")):
        size = file.stat().st_size
        with file.open("rb") as handle:
            start = handle.read(8)
            if len(start) < 8:
                return file.name, f"truncated: {size} bytes, not even a header"
            (length,) = struct.unpack("<Q", start)
            if length > size - 8:
                return file.name, f"truncated: {size} bytes, its header alone says {length + 8}"
            try:
                header = json.loads(handle.read(length))
                end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
            except (ValueError, KeyError, TypeError, IndexError):
                return file.name, "damaged: its header does not parse"
        expected = 8 + length + end
        if size < expected:
            return file.name, f"truncated: {size} of {expected} bytes"
        if size > expected:
            return file.name, f"longer than its header says: {size} bytes, {expected} expected"
    return None


def save_lm(model: "PreTrainedModel", tokenizer: "PreTrainedTokenizerBase", directory: Path, **provenance) -> str:
    """`save_pretrained` model and tokenizer, plus a manifest with the content hash; returns the hash."""
    model.save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)
    return write_manifest(directory, **provenance)


def write_manifest(directory: Path, **provenance) -> str:
    """The manifest of a saved directory: its content hash plus `provenance`; returns the hash."""
    digest = content_hash(directory)
    manifest = {"content_sha256": digest, **provenance}
    (directory / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return digest


def read_manifest(directory: str | Path) -> dict:
    file = Path(directory) / MANIFEST
    if not file.exists():
        return {}
    try:
        return json.loads(file.read_text())
    except (ValueError, UnicodeDecodeError) as error:
        raise InputError(
            f"{file} is not a valid manifest ({error}): "
            "rerun the stage that wrote it, or restore it with `dvc checkout`"
        ) from None


def describe_model(directory: str | Path) -> dict:
    """Provenance for the store's attributes: where the model came from and its content hash."""
    manifest = read_manifest(directory)
    return {
        "path": str(directory),
        "source": manifest.get("source", str(directory)),
        "sha256": manifest.get("content_sha256") or content_hash(directory),
    }


def save_weights(module: "torch.nn.Module", path: str | Path) -> None:
    """A module's state dict as one safetensors file (never pickle): how every small add-on is saved."""
    from safetensors.torch import save_file

    save_file({k: v.detach().contiguous().cpu() for k, v in module.state_dict().items()}, str(path))
