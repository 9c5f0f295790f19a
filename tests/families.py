"""Real-family checkpoints for tests: the architectures users run (Qwen2, Qwen3, Llama 3, GPT-2), shaped as the
real ones (GQA, qkv bias, q/k norm, tied or untied embeddings, the real padded vocabulary) but tiny (2 layers,
small width) with random weights, saved with `save_pretrained` beside their real tokenizer files and a
generation_config.json listing the real eos ids.

    directory = build_family("qwen2", tmp_path / "qwen2")   # then load_lm(directory), latentlab label --model ...

Tokenizers: Qwen3's (also Qwen2.5's vocabulary) and GPT-2's are vendored in tests/fixtures/tokenizers/ (xz);
Llama 3's is read from ../shared/fixtures/tokenizers/llama3, and `require_family` skips a test where it is absent.
"""

import lzma
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
VENDORED = REPO / "tests" / "fixtures" / "tokenizers"


def shared_tokenizers() -> Path:
    """../shared/fixtures/tokenizers beside the checkout; in a git worktree that lies elsewhere, beside the main
    checkout whose .git it shares (where ../shared is)."""
    beside = REPO.parent / "shared" / "fixtures" / "tokenizers"
    if beside.exists():
        return beside
    common = subprocess.run(
        ["git", "rev-parse", "--path-format=absolute", "--git-common-dir"], cwd=REPO, capture_output=True, text=True
    )
    main = Path(common.stdout.strip()).parent if common.returncode == 0 else REPO
    return main.parent / "shared" / "fixtures" / "tokenizers"


SHARED = shared_tokenizers()


@dataclass(frozen=True)
class Family:
    tokenizer: Path  # a folder with tokenizer_config.json and tokenizer.json (or tokenizer.json.xz)
    stop_ids: tuple[int, ...]  # generation_config.json's eos_token_id, as the real checkpoint lists them
    bos_id: int | None
    pad_id: int | None  # generation_config.json's pad_token_id


QWEN = Family(VENDORED / "qwen3", (151645, 151643), 151643, 151643)  # Qwen2.5-Instruct / Qwen3
FAMILIES = {
    "qwen2": QWEN,
    "qwen3": QWEN,
    "llama3": Family(SHARED / "llama3", (128001, 128008, 128009), 128000, None),  # Llama 3.1 Instruct
    "gpt2": Family(VENDORED / "gpt2", (50256,), 50256, None),
}
QWEN_VOCAB = 151_936  # Qwen2.5 / Qwen3 pad their embedding matrix beyond the tokenizer's 151,669 tokens


def config(name: str):
    """The transformers config of a family, real in shape, tiny in size."""
    from transformers import GPT2Config, LlamaConfig, Qwen2Config, Qwen3Config

    small = {"num_hidden_layers": 2, "intermediate_size": 64, "max_position_embeddings": 256}
    if name == "qwen2":  # Qwen2.5-0.5B: 14 query / 2 key-value heads, qkv bias, tied embeddings
        return Qwen2Config(
            vocab_size=QWEN_VOCAB, hidden_size=56, num_attention_heads=14, num_key_value_heads=2,
            tie_word_embeddings=True, bos_token_id=151643, eos_token_id=151645, **small,
        )  # fmt: skip
    if name == "qwen3":  # Qwen3-0.6B: per-head q/k RMSNorm, an explicit head_dim, tied embeddings
        return Qwen3Config(
            vocab_size=QWEN_VOCAB, hidden_size=32, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
            tie_word_embeddings=True, bos_token_id=151643, eos_token_id=151645, **small,
        )  # fmt: skip
    if name == "llama3":  # Llama 3: GQA, untied lm_head, no pad token
        return LlamaConfig(
            vocab_size=128_256, hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
            tie_word_embeddings=False, bos_token_id=128000, eos_token_id=128001, rope_theta=500_000.0, **small,
        )  # fmt: skip
    if name == "gpt2":  # fused c_attn, learned positions, tied lm_head
        return GPT2Config(vocab_size=50_257, n_embd=32, n_head=4, n_layer=2, n_positions=256)
    raise ValueError(f"unknown family {name!r}: choose among {sorted(FAMILIES)}")


def require_family(name: str) -> Family:
    """The family's description; skips the calling test when its tokenizer is not on this machine."""
    family = FAMILIES[name]
    if not (family.tokenizer / "tokenizer_config.json").exists():
        pytest.skip(f"{name}: no tokenizer at {family.tokenizer} (not vendored: its licence is not ours to ship)")
    return family


def copy_tokenizer(source: Path, directory: Path) -> None:
    """The real tokenizer files, unchanged, into `directory` (tokenizer.json decompressed where it is xz)."""
    shutil.copyfile(source / "tokenizer_config.json", directory / "tokenizer_config.json")
    if (source / "tokenizer.json").exists():
        shutil.copyfile(source / "tokenizer.json", directory / "tokenizer.json")
    else:
        with lzma.open(source / "tokenizer.json.xz") as packed, (directory / "tokenizer.json").open("wb") as out:
            shutil.copyfileobj(packed, out)


def build_family(name: str, directory: Path, seed: int = 0, max_shard_size: str | int | None = None) -> Path:
    """A random-weight checkpoint of the family `name` saved in `directory` (created), as the hub has it:
    config.json, model.safetensors, generation_config.json and the real tokenizer files. Returns `directory`.
    With `max_shard_size` (say "4MB") the weights are sharded as large hub checkpoints are:
    model-0000i-of-0000n.safetensors and model.safetensors.index.json."""
    from transformers import AutoModelForCausalLM, GenerationConfig

    family = require_family(name)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config(name))
    stops = list(family.stop_ids)
    model.generation_config = GenerationConfig(
        bos_token_id=family.bos_id, eos_token_id=stops if len(stops) > 1 else stops[0], pad_token_id=family.pad_id
    )
    model.save_pretrained(directory, **({"max_shard_size": max_shard_size} if max_shard_size else {}))
    if max_shard_size and not (directory / "model.safetensors.index.json").exists():
        raise ValueError(f"{name}: max_shard_size {max_shard_size} left one shard; give a smaller size")
    copy_tokenizer(family.tokenizer, directory)
    return directory
