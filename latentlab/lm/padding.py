"""The one padding helper: token rows of different lengths -> `(ids, mask)` rectangles.

Prompts are padded on the left, so every prompt ends at the last column, where generation starts;
training sequences and given completions on the right. Either way one vectorised copy, no loop per row.
"""

from collections.abc import Sequence

import torch


def pad_flat(flat: torch.Tensor, lengths: torch.Tensor, pad_id: int, left: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows stored back to back in `flat` (row i has `lengths[i]` tokens) -> (ids, mask) `(N, max length)`, long."""
    width = int(lengths.max()) if lengths.numel() else 0
    columns = torch.arange(width)
    mask = columns >= width - lengths[:, None] if left else columns < lengths[:, None]
    ids = torch.full((len(lengths), width), pad_id, dtype=torch.long)
    ids[mask] = flat.long()  # row-major: each row's tokens in order
    return ids, mask.long()


def pad_sequences(rows: Sequence[Sequence[int]], pad_id: int, left: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Token lists -> (ids, mask) `(N, longest)`, padded on the left or on the right."""
    lengths = torch.tensor([len(row) for row in rows], dtype=torch.long)
    flat = torch.tensor([token for row in rows for token in row], dtype=torch.long)
    return pad_flat(flat, lengths, pad_id, left)
