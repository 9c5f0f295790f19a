"""The one seeded endless batch iterator: every trainer draws its examples through it."""

from collections.abc import Iterator

import torch


def epoch_batches(n: int, batch_size: int, generator: torch.Generator) -> Iterator[list[int]]:
    """Endless lists of `batch_size` row indices into `n` items, reshuffled every epoch by `generator`.

    Each epoch is one `torch.randperm` of the rows cut into full batches; the ragged tail is dropped,
    so every batch has the same size and the order depends only on the generator's seed.
    """
    if n < batch_size:
        raise ValueError(f"{n} examples cannot fill a batch of {batch_size}")
    while True:
        order = torch.randperm(n, generator=generator).tolist()
        for start in range(0, n - n % batch_size, batch_size):
            yield order[start : start + batch_size]
