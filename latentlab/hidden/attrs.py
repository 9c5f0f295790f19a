"""What a hidden-state store says about itself: its Zarr attributes as one typed model, `StoreAttrs`.

Every writer builds one (the label run, `latentlab label` / `extract`, NPZ import) and every reader parses one
(`open_store`, `latentlab info`, the dataset, NPZ export, live extraction in the grid world), so a setting
recorded in a store is read back by the same code that wrote it: live extraction gets its whole
`ExtractConfig` from `extract_config()` (pooling included) instead of rebuilding it key by key.

The bytes are part of the contract: a store's zarr.json is pinned by dvc.lock, so `to_attributes()` writes the
keys the format has always had, in the same order, and leaves out what earlier versions left out: the keys of
an imported store's missing settings, `stop_at_eos` unless False, `prompt` unless chat. Reading is as
forgiving: absent `stop_at_eos` is True, absent `prompt` raw, absent `pooling` mean, absent `hook_names` and
`num_blocks` (stores written before they were recorded) None. An attribute missing or of the wrong type stops
the read with a message naming the store, the key and what rewrites it.
"""

from collections.abc import Mapping
from typing import Any, Literal

from pydantic import Field, PrivateAttr, ValidationError

from latentlab.common.config import Config
from latentlab.hidden.extract import POSITIONS, ExtractConfig
from latentlab.lm.pooling import Pooling
from latentlab.lm.prompt_format import RAW, PromptFormat

FORMAT = "latentlab.hidden/1"
REWRITE = "rerun what wrote it: `dvc repro label` for the DAG's stores, `latentlab label` or `latentlab npz import`"
# optional keys left out of zarr.json when unset (None): what imported stores and earlier versions lack
_ABSENT_WHEN_NONE = ("fingerprint", "layer_indices", "hook_names", "num_blocks", "seed", "temperature", "top_p")


class ModelInfo(Config):
    """Where the model came from (`describe_model`); an imported store knows only its source file."""

    path: str | None = None
    source: str
    sha256: str | None = None


class NormalizationStats(Config):
    """Per-layer statistics `StoreDataset(normalize=True, save_stats=True)` keeps (latentlab/hidden/dataset.py)."""

    layers: list[int]
    mean: list[list[float]]  # (L, H)
    std: list[float]  # (L,)
    samples: int


class StoreAttrs(Config):
    """A store's attributes, in the order zarr.json holds them."""

    format: Literal["latentlab.hidden/1"] = FORMAT
    complete: bool = False
    """Every shard written: readers refuse a store until this is true."""
    fingerprint: str | None = None
    """The label job's identity (config, seed, model, rows): a rerun resumes only the same job."""
    model: ModelInfo
    layers: list[int] = Field(min_length=1)
    """As asked for, output_hidden_states numbering (-1: the final norm's output)."""
    layer_indices: list[int] | None = None
    """The same layers resolved to 0..num_blocks."""
    hook_names: list[str] | None = None
    """The TransformerLens hook of each layer (latentlab/hidden/info.py)."""
    num_blocks: int | None = None
    mode: Literal["prompt", "generate", "text", "imported"]
    tokens: int
    """The extraction's `tokens` (imported: the file's T)."""
    pooling: Pooling = "mean"
    positions: str
    """What each row was pooled over, in words (extract.POSITIONS)."""
    dtype: str
    """The model's compute dtype (imported: the file's hidden_state dtype)."""
    hidden_size: int
    rows: int
    seed: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    stop_at_eos: bool = True
    prompt: PromptFormat = RAW
    normalization: dict[str, NormalizationStats] | None = None
    """Normalisation statistics per kind (pooled, tokens), when a dataset was asked to save them."""

    _location: str = PrivateAttr("")  # the store these were read from, for messages

    def __eq__(self, other: object) -> bool:
        """Equal when they say the same: where each was read from is not part of it."""
        return isinstance(other, StoreAttrs) and self.model_dump() == other.model_dump()

    __hash__ = None  # lists inside: not hashable, as pydantic's own frozen models with lists are not

    @classmethod
    def of_extraction(
        cls,
        cfg: ExtractConfig,
        prompt_format: PromptFormat = RAW,
        *,
        text: bool = False,
        **store: Any,
    ) -> "StoreAttrs":
        """The attributes of a store extracted with `cfg` (`text`: re-extracted given completions) in
        `prompt_format`; `store` holds the rest (model, fingerprint, layer_indices, hidden_size, rows, ...)."""
        mode = "text" if text else cfg.mode
        return cls(
            **store,
            layers=list(cfg.layers),
            mode=mode,
            tokens=cfg.tokens,
            pooling=cfg.pooling,
            positions=POSITIONS[mode] if text else cfg.positions,
            dtype=cfg.dtype,
            temperature=cfg.temperature,
            top_p=cfg.top_p,
            stop_at_eos=cfg.stop_at_eos,
            prompt=prompt_format,
        )

    @classmethod
    def read(cls, attributes: Mapping, store: str) -> "StoreAttrs":
        """Parse a store's attributes; anything missing or malformed is named, with the store and the fix."""
        try:
            attrs = cls.model_validate(dict(attributes))
        except ValidationError as error:
            problems = "; ".join(_problem(e) for e in error.errors())
            raise ValueError(f"{store} has unreadable attributes ({problems}): {REWRITE}") from None
        attrs._location = str(store)
        return attrs

    def to_attributes(self) -> dict:
        """What zarr.json holds: today's keys in today's order, the optional ones only when set."""
        attributes = self.model_dump(mode="json", exclude={"model", "prompt", "normalization", "stop_at_eos"})
        attributes["model"] = self.model.model_dump(exclude_none=True)
        attributes = {name: attributes[name] for name in type(self).model_fields if name in attributes}  # field order
        for name in _ABSENT_WHEN_NONE:
            if attributes[name] is None:
                del attributes[name]
        if not self.stop_at_eos:  # absent: stopped at end-of-sequence
            attributes["stop_at_eos"] = False
        if self.prompt != RAW:  # absent: raw prompts
            attributes["prompt"] = self.prompt.model_dump()
        if self.normalization is not None:
            attributes["normalization"] = {k: v.model_dump() for k, v in self.normalization.items()}
        return attributes

    @property
    def prompt_format(self) -> PromptFormat:
        """How the rows' prompts were encoded."""
        return self.prompt

    def extract_config(self, layers: list[int] | None = None, tokens: int | None = None) -> ExtractConfig:
        """The extraction these states came from (`layers`, `tokens`: others in their place), e.g. to extract
        new texts live exactly as the training states were labelled."""
        if self.mode == "imported" or self.temperature is None or self.top_p is None:
            raise ValueError(
                f"{self._location or 'the store'}: mode {self.mode} records no extraction settings (temperature, "
                "top_p); extract with explicit settings, or label the texts with `latentlab label`"
            )
        try:
            return ExtractConfig(
                layers=list(self.layers if layers is None else layers),
                tokens=self.tokens if tokens is None else tokens,
                temperature=self.temperature,
                top_p=self.top_p,
                stop_at_eos=self.stop_at_eos,
                dtype=self.dtype,
                pooling=self.pooling,
            )
        except ValidationError as error:
            problems = "; ".join(_problem(e) for e in error.errors())
            raise ValueError(f"{self._location or 'the store'}: cannot extract as it was ({problems})") from None


def _problem(error: dict) -> str:
    key = ".".join(map(str, error["loc"])) or "attributes"
    if error["type"] == "missing":
        return f"attribute {key!r} is missing"
    got = repr(error.get("input"))
    return f"attribute {key!r}: {error['msg']} (got {got if len(got) <= 60 else got[:57] + '...'})"
