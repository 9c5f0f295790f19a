"""Pooling: the states of a row's positions -> one vector per row, the single definition every reader uses.

The extractor (`latentlab label`, `latentlab serve`, live extraction in the grid world: `(B, T, L, H)` states)
and the NLA critic (`(B, T, H)`) pool through `pool`, so a store labelled with one mode and a critic trained
with it mean the same thing, and a new mode is one branch here, one name in `Pooling` and one test.

    mean      the mean over the positions that count, accumulated in float32
    last      the last position that counts (generate: the position that produced end-of-sequence)
    max       the element-wise max over the positions that count
    cls       the first position that counts
    weighted  softmax over the positions that count of learned scores (the critic's w . h_t); extraction has
              no scores, so it refuses this mode (`LEARNED`)

`mask (B, T)` says which positions count: padding (left or right) and positions after end-of-sequence are
never read, whatever they hold. Every row is expected to have one position that counts; a row with none
pools to zeros (mean) and is otherwise undefined.

Mean is a float32 einsum over T with 0/1 weights on states already zeroed where they do not count: on the
CPU it adds the positions one after another, so it reproduces the extractor's earlier running sums (and its
earlier `_masked_mean`) bit for bit, and so the stores' bytes pinned in dvc.lock.
"""

from typing import Literal

import torch

Pooling = Literal["last", "mean", "max", "cls", "weighted"]
LEARNED = ("weighted",)  # modes that need learned scores: a critic has them, an extractor does not


def pool(states: torch.Tensor, mask: torch.Tensor, how: Pooling, scores: torch.Tensor | None = None) -> torch.Tensor:
    """`(B, T, ...)` states (e.g. `(B, T, L, H)` or `(B, T, H)`), `(B, T)` mask of the positions that count
    -> `(B, ...)` float32; `scores (B, T)` for `weighted` only."""
    counts = mask.bool()
    spread = counts.reshape(*counts.shape, *[1] * (states.dim() - 2))  # (B, T, 1, ...): broadcast over the rest
    states = states.float()
    if how == "mean":
        weights = counts.to(torch.float32)
        sums = torch.einsum("bt...,bt->b...", torch.where(spread, states, 0), weights)
        return sums / weights.sum(1).clamp(min=1).reshape(-1, *[1] * (sums.dim() - 1))
    if how == "max":
        return states.masked_fill(~spread, float("-inf")).amax(1)
    if how in ("cls", "last"):
        positions = torch.arange(counts.shape[1], device=counts.device)
        first, last = counts.long().argmax(1), (counts * positions).amax(1)  # (B,)
        return states[torch.arange(len(states), device=states.device), first if how == "cls" else last]
    if how == "weighted":
        if scores is None:
            raise ValueError("pooling weighted needs scores (B, T): learned, e.g. the NLA critic's w . h_t")
        # (B, T): 0 where a position does not count
        weights = torch.softmax(scores.float().masked_fill(~counts, float("-inf")), dim=1)
        return (weights.reshape(spread.shape) * torch.where(spread, states, 0)).sum(1)
    raise ValueError(f"unknown pooling {how!r} (one of {', '.join(Pooling.__args__)})")
