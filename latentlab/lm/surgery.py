"""Attention surgery: edit attention projections in place, and undo the edit bit for bit.

`attention_targets(model, layers, projections)` finds the q/k/v/o projections of chosen decoder
blocks with their head layout, for the Llama / Qwen2 layout (separate `q_proj`, `k_proj`, `v_proj`,
`o_proj` Linear layers, `weight` of shape `(out, in)`) and GPT-2's (one fused `c_attn` Conv1D whose
`weight` is `(in, 3 * H)` holding q | k | v side by side, and `c_proj` `(H, H)` Conv1D).

`SurgicalTheater(model, targets)` is the context manager that makes an edit cheap to try: on entry it
copies only the targeted tensors (never the model), the body edits them in place, and on exit they
are copied back exactly, also when the body raises. `theater.commit()` keeps the edit instead.

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

from latentlab.lm.capture import decoder_blocks

Projection = Literal["q", "k", "v", "o"]
PROJECTIONS: tuple[Projection, ...] = ("q", "k", "v", "o")


@dataclass(frozen=True)
class AttentionTarget:
    """One projection of one block: which slice of which tensors belongs to which head.

    `weight` (and `bias` if any) are the module's parameters; `feature_dim` is the dimension of
    `weight` along which the heads are laid out and `offset` where this projection's features start
    on it (non-zero only inside GPT-2's fused c_attn). Head h owns features
    `offset + h * head_dim ... offset + (h + 1) * head_dim`. `bias` is laid out on its only dimension
    and is scaled with the features only for q/k/v (o's bias is added after the heads are summed).
    """

    name: str  # e.g. "layers.2.q"
    weight: nn.Parameter
    bias: nn.Parameter | None
    feature_dim: int
    offset: int
    heads: int
    head_dim: int
    projection: Projection

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


def attention_targets(
    model, layers: Sequence[int] | None = None, projections: Sequence[Projection] = PROJECTIONS
) -> list[AttentionTarget]:
    """The chosen projections of the chosen blocks (`layers` index blocks 0..L-1, negatives allowed;
    None: every block), in block order, then in the order of `projections`."""
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
        attention = getattr(blocks[index], "self_attn", None) or getattr(blocks[index], "attn", None)
        for p in projections:
            n_heads = kv_heads if p in ("k", "v") else heads
            if hasattr(attention, "q_proj"):  # Llama / Qwen2: nn.Linear, weight (out, in)
                module = getattr(attention, f"{p}_proj")
                feature_dim, offset = (1 if p == "o" else 0), 0
            elif hasattr(attention, "c_attn"):  # GPT-2: Conv1D, weight (in, out); c_attn out = [q | k | v]
                module = attention.c_proj if p == "o" else attention.c_attn
                feature_dim = 0 if p == "o" else 1
                offset = 0 if p == "o" else "qkv".index(p) * heads * head_dim
            else:
                raise TypeError(f"block {index}: no known attention layout in {type(attention).__name__}")
            targets.append(
                AttentionTarget(
                    f"layers.{index}.{p}", module.weight, module.bias, feature_dim, offset, n_heads, head_dim, p
                )
            )
    return targets


@torch.no_grad()
def scale_heads(targets: Sequence[AttentionTarget], factors: torch.Tensor) -> None:
    """In place: head h of target i has its features multiplied by `factors[i, h]`.

    `factors` is `(len(targets), max heads)`; a target with fewer heads (GQA's k/v) uses the first columns.
    """
    for target, row in zip(targets, factors, strict=True):
        # (heads,) -> (heads * head_dim,): one factor per feature of this projection
        per_feature = row[: target.heads].repeat_interleave(target.head_dim).to(target.weight)
        span = slice(target.offset, target.offset + per_feature.numel())
        if target.feature_dim == 0:
            target.weight[span, :] *= per_feature[:, None]
        else:
            target.weight[:, span] *= per_feature[None, :]
        if target.bias is not None and target.projection != "o":
            target.bias[span] *= per_feature


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
        """Bytes of the copy held while the theater is open."""
        return sum(p.numel() * p.element_size() for p in self._params)

    def _keys(self) -> list[int]:
        return [p.untyped_storage().data_ptr() for p in self._params]

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
                snapshots = [p.detach().clone() for p in self._params]
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
        """||W - W_0|| / ||W_0|| over every targeted tensor together (Frobenius): how big the edit is so far."""
        if self._snapshots is None:
            raise SurgeryError("relative_change() is only possible inside the theater's `with` block")
        delta = sum(float((p - s).double().square().sum()) for p, s in zip(self._params, self._snapshots))
        norm = sum(float(s.double().square().sum()) for s in self._snapshots)
        return (delta / norm) ** 0.5 if norm > 0 else (0.0 if delta == 0 else float("inf"))

    def __exit__(self, exc_type, exc, traceback) -> None:
        """Restore every tensor that can be restored, release them all, then name those that could not be."""
        failed: list[str] = []
        try:
            if exc_type is not None or not self._committed:
                self._committed = False  # `committed` reads, after the block, whether the edit was kept
                with torch.no_grad():
                    for name, param, snapshot in zip(self._names, self._params, self._snapshots, strict=True):
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
