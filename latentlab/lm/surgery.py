"""Attention surgery: edit attention projections in place, and undo the edit bit for bit.

`attention_targets(model, layers, projections)` finds the q/k/v/o projections of chosen decoder
blocks with their head layout. Layouts (`weight` of nn.Linear is `(out, in)`, of GPT-2's Conv1D `(in, out)`):
- Llama / Qwen2 / Qwen3 / Mistral: separate `q_proj`, `k_proj`, `v_proj` (GQA: fewer k/v heads) and `o_proj`
  (or `dense` / `out_proj`);
- Phi-3: one fused `qkv_proj` Linear whose output features are `[q (heads) | k (kv heads) | v (kv heads)]`;
- GPT-NeoX and BLOOM: one fused `query_key_value` Linear interleaved per head, `[h0 q, k, v | h1 q, k, v | ...]`
  (their forward views it as `(heads, 3 * head_dim)`), and `dense`;
- Falcon: `query_key_value` in each of its three layouts (multi-query `[q | k | v]` with one k/v head; the old
  layout interleaved per head as GPT-NeoX; the new decoder architecture grouped per k/v head,
  `[g0 q.. k v | g1 q.. k v | ...]`), and `dense`;
- GPT-2: one fused `c_attn` Conv1D, `weight` `(in, 3 * H)` holding q | k | v side by side (columns, not rows),
  and `c_proj` `(H, H)` Conv1D.
A projection the attention normalises after it (Qwen3's per-head `q_norm` / `k_norm`, OLMo-2's, Phi's
`q_layernorm`, a `v_norm`) is refused with an error naming the norm: a head's scale there is normalised away
(a per-head norm: the logits move by < 1e-6) or spread over every head (a norm over the whole projection), so
the surgeon would believe it edits while it does not. Its norm weight is one vector shared by the heads, so
no per-head edit exists there either; v and o of such a model are edited as usual.

`SurgicalTheater(model, targets)` is the context manager that makes an edit cheap to try: on entry it
copies only the targeted tensors (never the model; a fused tensor once, whole), the body edits them in place,
and on exit they are copied back exactly, also when the body raises. `theater.commit()` keeps the edit instead.

    with SurgicalTheater(model, targets) as theater:
        scale_heads(targets, factors)     # a bounded nudge, see below
        reward = evaluate(model)
        if reward > threshold:
            theater.commit()

A second theater over a tensor that an open theater holds (nesting, or two theaters sharing a
weight) is refused: its restore would race the first one's. Memory: one copy of the targeted
tensors, `theater.snapshot_bytes`; `benchmarks/surgery.py` measures it against cloning the model.

`scale_heads` is the edit the surgeon makes: per head, multiply the rows a head reads out of q, k or v
(its output features) or the columns o reads from it (its input features) by a factor near 1.
"""

import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from latentlab.common.parallel import local_rows, whole_sums
from latentlab.lm.capture import decoder_blocks

Projection = Literal["q", "k", "v", "o"]
PROJECTIONS: tuple[Projection, ...] = ("q", "k", "v", "o")

# norms an attention module applies to a projection's output before attending, by the names transformers uses
_NORMS: dict[str, tuple[str, ...]] = {
    "q": ("q_norm", "q_layernorm", "query_layernorm"),
    "k": ("k_norm", "k_layernorm", "key_layernorm"),
    "v": ("v_norm",),
}
_OUTPUTS = ("o_proj", "dense", "out_proj")  # o of the separate and query_key_value layouts
_INTERLEAVED = ("GPTNeoXAttention", "GPTNeoXJapaneseAttention", "BloomAttention")  # query_key_value per head


@dataclass(frozen=True)
class AttentionTarget:
    """One projection of one block: which slices of which tensors belong to which head.

    `weight` (and `bias` if any) are the module's parameters; `feature_dim` is the dimension of
    `weight` along which the heads are laid out, and head h owns features `starts[h] ... starts[h] + head_dim`
    on it (`starts[h] = h * head_dim` for a separate projection; inside a fused q/k/v weight they are the
    places the model's forward reads that head from). `bias` is laid out on its only dimension and is scaled
    with the features only for q/k/v (o's bias is added after the heads are summed).
    """

    name: str  # e.g. "layers.2.q"
    weight: nn.Parameter
    bias: nn.Parameter | None
    feature_dim: int
    starts: tuple[int, ...]
    head_dim: int
    projection: Projection

    @property
    def heads(self) -> int:
        return len(self.starts)

    @property
    def offset(self) -> int:
        """Where head 0's features start (non-zero only inside a fused weight)."""
        return self.starts[0]

    @property
    def features(self) -> slice | torch.Tensor:
        """Every feature of this projection, head after head: a slice when they are contiguous, else indices."""
        first = self.starts[0]
        if self.starts == tuple(range(first, first + self.heads * self.head_dim, self.head_dim)):
            return slice(first, first + self.heads * self.head_dim)
        return torch.tensor([s + i for s in self.starts for i in range(self.head_dim)])

    @property
    def parameters(self) -> list[nn.Parameter]:
        return [self.weight] + ([self.bias] if self.bias is not None and self.projection != "o" else [])


def _head_layout(model) -> tuple[int, int, int]:
    config = model.config
    heads = getattr(config, "num_attention_heads", None) or config.n_head
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    hidden = getattr(config, "hidden_size", None) or config.n_embd
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    return heads, kv_heads, head_dim


def _runs(first: int, heads: int, step: int) -> tuple[int, ...]:
    """Head h starts at `first + h * step`."""
    return tuple(first + h * step for h in range(heads))


def _refuse_normalised(attention: nn.Module, index: int, p: Projection, head_dim: int) -> None:
    """A ValueError naming the norm if `attention` normalises projection `p`'s output."""
    for name in _NORMS.get(p, ()):
        norm = getattr(attention, name, None)
        if not isinstance(norm, nn.Module) or isinstance(norm, nn.Identity):
            continue
        weight = getattr(norm, "weight", None)
        size = None if weight is None else weight.numel()
        if size == head_dim:
            why = f"it normalises each head's {p} over its {head_dim} features, so a head's scale is normalised away"
        else:
            why = f"it normalises {p} after the projection, so a head's scale is not that head's alone"
        raise ValueError(
            f"block {index}: {p} targets are refused on {type(attention).__name__}: its {name} "
            f"({type(norm).__name__}) follows {p}'s projection and {why}; edit "
            + ("o instead (projections: [o])" if p == "v" else "v and o instead (projections: [v, o])")
        )


def _fused_qkv(attention: nn.Module, heads: int, kv_heads: int, head_dim: int) -> dict[str, tuple[int, ...]]:
    """Head starts of q, k and v inside a `query_key_value` weight's output features, as the model's forward
    splits them; a TypeError for a module whose layout is not known."""
    kind = type(attention).__name__
    if hasattr(attention, "new_decoder_architecture"):  # Falcon: read its own sizes (multi_query: 1 k/v head)
        heads, kv_heads, head_dim = attention.num_heads, attention.num_kv_heads, attention.head_dim
        if attention.new_decoder_architecture:  # per k/v group g: [q heads of g | k_g | v_g]
            group = heads // kv_heads
            q = tuple(((h // group) * (group + 2) + h % group) * head_dim for h in range(heads))
            return {
                "q": q,
                "k": _runs(group * head_dim, kv_heads, (group + 2) * head_dim),
                "v": _runs((group + 1) * head_dim, kv_heads, (group + 2) * head_dim),
            }
        if attention.multi_query:  # [q (heads) | k (1) | v (1)]
            return {"q": _runs(0, heads, head_dim), "k": (heads * head_dim,), "v": ((heads + 1) * head_dim,)}
    elif kind not in _INTERLEAVED:
        raise TypeError(f"{kind}: a fused query_key_value of unknown layout (known: Falcon, {', '.join(_INTERLEAVED)})")
    return {p: _runs(i * head_dim, heads, 3 * head_dim) for i, p in enumerate("qkv")}  # [h q, k, v | ...]


def _locate(attention: nn.Module, p: Projection, heads: int, kv_heads: int, head_dim: int):
    """(module, feature_dim, head starts) of projection `p` in one attention module, or None if unknown."""
    if p == "o":
        if hasattr(attention, "c_attn"):  # GPT-2's Conv1D c_proj: weight (in, out), the heads are its rows
            return attention.c_proj, 0, _runs(0, heads, head_dim)
        module = next((getattr(attention, n) for n in _OUTPUTS if hasattr(attention, n)), None)
        return None if module is None else (module, 1, _runs(0, heads, head_dim))
    n_heads = kv_heads if p in ("k", "v") else heads
    if hasattr(attention, "q_proj"):  # Llama / Qwen2 / Qwen3: nn.Linear, weight (out, in)
        return getattr(attention, f"{p}_proj"), 0, _runs(0, n_heads, head_dim)
    if hasattr(attention, "c_attn"):  # GPT-2: Conv1D, weight (in, out); c_attn out = [q | k | v]
        return attention.c_attn, 1, _runs("qkv".index(p) * heads * head_dim, heads, head_dim)
    if hasattr(attention, "qkv_proj"):  # Phi-3: nn.Linear, out = [q (heads) | k (kv heads) | v (kv heads)]
        first = {"q": 0, "k": heads * head_dim, "v": (heads + kv_heads) * head_dim}[p]
        return attention.qkv_proj, 0, _runs(first, n_heads, head_dim)
    if hasattr(attention, "query_key_value"):  # GPT-NeoX, BLOOM, Falcon: nn.Linear, weight (out, in)
        return attention.query_key_value, 0, _fused_qkv(attention, heads, kv_heads, head_dim)[p]
    return None


def attention_targets(
    model, layers: Sequence[int] | None = None, projections: Sequence[Projection] = PROJECTIONS
) -> list[AttentionTarget]:
    """The chosen projections of the chosen blocks (`layers` index blocks 0..L-1, negatives allowed;
    None: every block), in block order, then in the order of `projections`.

    A TypeError for an attention layout not listed in the module docstring; a ValueError for a q/k (or v)
    projection the attention normalises afterwards (naming the norm)."""
    blocks, _ = decoder_blocks(model)
    n = len(blocks)
    chosen = list(range(n)) if layers is None else [i + n if i < 0 else i for i in layers]
    if any(not 0 <= i < n for i in chosen):
        raise IndexError(f"layers {list(layers)} out of range: this model has blocks 0..{n - 1} (or -{n}..-1)")
    heads, kv_heads, head_dim = _head_layout(model)
    unknown = set(projections) - set(PROJECTIONS)
    if unknown:
        raise ValueError(f"unknown projections {sorted(unknown)}: choose among {PROJECTIONS}")
    targets = []
    for index in chosen:
        block = blocks[index]
        attention = next(
            (getattr(block, n) for n in ("self_attn", "attn", "attention", "self_attention") if hasattr(block, n)),
            None,
        )
        for p in projections:
            found = None if attention is None else _locate(attention, p, heads, kv_heads, head_dim)
            if found is None:
                kind = type(attention if attention is not None else block).__name__
                raise TypeError(f"block {index}: no known attention layout for {p} in {kind}")
            _refuse_normalised(attention, index, p, head_dim)
            module, feature_dim, starts = found
            size = module.weight.shape[feature_dim]
            if max(starts) + head_dim > size:
                raise TypeError(
                    f"block {index}: {p} of {type(attention).__name__} needs features up to {max(starts) + head_dim} "
                    f"but its weight has {size} along dimension {feature_dim}: an unexpected head layout"
                )
            targets.append(
                AttentionTarget(f"layers.{index}.{p}", module.weight, module.bias, feature_dim, starts, head_dim, p)
            )
    return targets


@torch.no_grad()
def scale_heads(targets: Sequence[AttentionTarget], factors: torch.Tensor) -> None:
    """In place: head h of target i has its features multiplied by `factors[i, h]`.

    `factors` is `(len(targets), max heads)`; a target with fewer heads (GQA's k/v) uses the first columns.
    """
    for target, row in zip(targets, factors, strict=True):
        weight, first = local_rows(target.weight)  # a shard (fsdp): this rank's rows alone
        # (heads,) -> (heads * head_dim,): one factor per feature of this projection, in `features` order
        per_feature = row[: target.heads].repeat_interleave(target.head_dim).to(weight)
        span = target.features
        if target.feature_dim == 0:
            rows, scale = _held_rows(span, per_feature, first, weight.shape[0], target.weight.shape[0])
            weight[rows, :] *= scale[:, None]
        else:
            weight[:, span] *= per_feature[None, :]
        if target.bias is not None and target.projection != "o":
            bias, first = local_rows(target.bias)
            rows, scale = _held_rows(span, per_feature, first, bias.shape[0], target.bias.shape[0])
            bias[rows] *= scale


def _held_rows(
    span: slice | torch.Tensor, per_feature: torch.Tensor, first: int, held: int, rows: int
) -> tuple[slice | torch.Tensor, torch.Tensor]:
    """(the features of `span` among the `held` rows from row `first` of a `rows`-row tensor, as local indices;
    their factors). A whole tensor holds them all: `span` and `per_feature` as they are."""
    if first == 0 and held == rows:
        return span, per_feature
    if isinstance(span, slice):
        start = max(span.start, first)
        stop = max(start, min(span.stop, first + held))
        return slice(start - first, stop - first), per_feature[start - span.start : stop - span.start]
    inside = (span >= first) & (span < first + held)
    return span[inside] - first, per_feature[inside.to(per_feature.device)]


_LOCK = threading.Lock()
_HELD: dict[int, "SurgicalTheater"] = {}  # storage address of a tensor -> the open theater holding it


class SurgeryError(RuntimeError):
    """A theater was misused: nested, overlapping another, or committed outside its block."""


class SurgicalTheater:
    """Snapshot the targeted tensors on entry; restore them bit for bit on exit unless committed.

    `targets`: AttentionTargets or bare parameters. A body that raises always leaves the weights as
    they were on entry (even after `commit()`): a half-made edit is never kept. Both ends are exception-safe:
    entry copies every target before it marks any as held (a copy that fails holds nothing), and exit
    restores every tensor it can and releases them all before it raises one `SurgeryError` naming each
    tensor it could not restore (e.g. one whose shape the body changed).
    """

    def __init__(self, model: nn.Module, targets: Sequence[AttentionTarget | nn.Parameter]):
        params: dict[int, nn.Parameter] = {}
        for target in targets:
            for p in target.parameters if isinstance(target, AttentionTarget) else [target]:
                params[id(p)] = p
        names = {id(p): name for name, p in model.named_parameters()}
        if not params:
            raise ValueError("a SurgicalTheater needs at least one target")
        if any(key not in names for key in params):
            raise ValueError("a target is not a parameter of the model")
        self.model = model
        self._params = list(params.values())
        self._names = [names[key] for key in params]
        self._snapshots: list[torch.Tensor] | None = None
        self._held: list[int] = []  # the storage keys registered on entry (a body may swap a tensor's storage)
        self._committed = False

    @property
    def snapshot_bytes(self) -> int:
        """Bytes of the copy held while the theater is open (on this rank: of its shards, where fsdp shards them)."""
        return sum(local.numel() * local.element_size() for local in self._locals())

    def _locals(self) -> list[torch.Tensor]:
        """The targeted tensors as this rank holds them: whole, or its rows of a shard (`local_rows`)."""
        return [local_rows(p)[0] for p in self._params]

    def _keys(self) -> list[int]:
        return [local.untyped_storage().data_ptr() for local in self._locals() if local.numel()]

    def __enter__(self) -> "SurgicalTheater":
        """Snapshot first, then register: a snapshot that fails (out of memory) leaves nothing held."""
        with _LOCK:
            if self._snapshots is not None:
                raise SurgeryError("this theater is already open: a theater cannot be nested in itself")
            keys = self._keys()
            busy = [k for k in keys if k in _HELD]
            if busy:
                raise SurgeryError(
                    f"{len(busy)} targeted tensor(s) are already held by an open SurgicalTheater: "
                    "close it (or commit and close it) before opening another over the same weights"
                )
            with torch.no_grad():
                snapshots = [local.detach().clone() for local in self._locals()]
            for key in keys:
                _HELD[key] = self
            self._held, self._snapshots, self._committed = keys, snapshots, False
        return self

    def commit(self) -> None:
        """Keep the edits when the block exits normally."""
        if self._snapshots is None:
            raise SurgeryError("commit() is only possible inside the theater's `with` block")
        self._committed = True

    @property
    def committed(self) -> bool:
        return self._committed

    @torch.no_grad()
    def relative_change(self) -> float:
        """||W - W_0|| / ||W_0|| over every targeted tensor together (Frobenius): how big the edit is so far. Over
        whole tensors also where they are shards (a collective then: every rank of the shards calls it)."""
        if self._snapshots is None:
            raise SurgeryError("relative_change() is only possible inside the theater's `with` block")
        partials = [
            torch.stack([(local - s).double().square().sum(), s.double().square().sum()])
            for local, s in zip(self._locals(), self._snapshots, strict=True)
        ]
        sums = whole_sums(partials, self._params)
        delta = sum(float(pair[0]) for pair in sums)
        norm = sum(float(pair[1]) for pair in sums)
        return (delta / norm) ** 0.5 if norm > 0 else (0.0 if delta == 0 else float("inf"))

    def __exit__(self, exc_type, exc, traceback) -> None:
        """Restore every tensor that can be restored, release them all, then name those that could not be."""
        failed: list[str] = []
        try:
            if exc_type is not None or not self._committed:
                self._committed = False  # `committed` reads, after the block, whether the edit was kept
                with torch.no_grad():
                    for name, param, snapshot in zip(self._names, self._locals(), self._snapshots, strict=True):
                        if param.shape != snapshot.shape:
                            failed.append(f"{name} (shape {tuple(snapshot.shape)} became {tuple(param.shape)})")
                            continue
                        try:
                            param.copy_(snapshot)
                        except Exception as error:  # noqa: BLE001 - named below; the other tensors still restore
                            failed.append(f"{name} ({type(error).__name__}: {error})")
        finally:
            with _LOCK:
                for key in self._held:
                    if _HELD.get(key) is self:
                        del _HELD[key]
            self._held, self._snapshots = [], None
        if failed:
            raise SurgeryError(
                f"{len(failed)} targeted tensor(s) could not be restored on leaving the theater (the others were): "
                + "; ".join(failed)
            )
