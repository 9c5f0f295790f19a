"""A PyTorch dataset over a hidden-state store (and its row table), for training on the states.

    data = StoreDataset("hidden/mine.zarr", layers=[-1], kind="tokens", normalize=True, batch_size=512)
    for batch in DataLoader(data, batch_size=None, num_workers=2):
        batch["x"]        # (512, L, H) float32: per-token states of the chosen layers, normalised
        batch["id"]       # (512,) the rows' ids; batch["position"]: which generated token

- `kind="pooled"`: one sample per row, `pooled (N, L, H)`; `kind="tokens"`: one sample per pooled
  position of every row (`tokens (N, T, L, H)` minus the zero padding past `n_positions`), the unit
  SAELens' activation store trains on.
- Shuffled by chunk: the store's chunks (its `batch_size` rows) are visited in a random order and
  the samples of a chunk are shuffled in memory, so every read is one whole, sequential chunk (a
  shuffle by row would read a chunk per sample). `set_epoch(e)` draws a new order: the order is a
  function of (seed, epoch) only.
- `DataLoader(num_workers=W)`: worker w takes chunks w, w + W, ... of the order; each worker opens
  the store itself, on first use (a Zarr group is not handed across processes).
- `normalize=True`: `(x - mean) / std` per layer, with `mean` the layer's mean vector `(H,)` and
  `std` the root-mean-square deviation per dimension, `sqrt(E ||x - mean||^2 / H)` (a scalar): the
  normalised states have mean 0 and `E ||x||^2 = H`, SAELens' convention of scaling activations to
  an expected norm of sqrt(d_in), after centring. The statistics are computed once, over every
  sample of the kind (float64 sums, one pass); with `save_stats=True` they are kept in the store's
  attributes under `normalization`, so later datasets reuse them. Off by default: reading a store
  never changes it (a DVC output would change its hash).
- A damaged chunk stops the read with `StoreDamaged` (a ValueError) naming the store, the array and the
  file (latentlab/hidden/store.py); `latentlab info --verify` checks a whole store beforehand.
"""

import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Literal

import numpy as np
import polars as pl
import torch
from torch.utils.data import IterableDataset, get_worker_info

from latentlab.common.atomic import atomic_output
from latentlab.hidden.store import (
    filesystem,
    is_url,
    layer_position,
    open_store,
    read_parquet,
    store_attrs,
    store_location,
)


class StoreDataset(IterableDataset):
    """Samples of chosen layers of a finished store (see the module doc)."""

    def __init__(
        self,
        store: str | Path,
        layers: Sequence[int] | None = None,
        kind: Literal["pooled", "tokens"] = "pooled",
        table: str | Path | pl.DataFrame | None = None,
        columns: Sequence[str] = (),
        shuffle: bool = True,
        seed: int = 0,
        normalize: bool = False,
        save_stats: bool = False,
        batch_size: int | None = None,
    ):
        self.path = store_location(store)  # a path or an fsspec URL
        group = open_store(self.path)  # checked here, in the main process; workers reopen it
        attrs = store_attrs(group)
        if kind not in ("pooled", "tokens"):
            raise ValueError(f"kind must be 'pooled' or 'tokens', not {kind!r}")
        if kind not in group:
            raise ValueError(f"{self.path} holds no {kind!r} array (label it with --store-tokens)")
        self.layers = list(layers) if layers is not None else list(attrs.layers)
        self.positions = [layer_position(group, layer) for layer in self.layers]  # along the store's L axis
        self.kind, self.shuffle, self.seed, self.batch_size, self.epoch = kind, shuffle, seed, batch_size, 0
        self.rows = attrs.rows
        self.chunk_rows = group[kind].chunks[0]
        self.ids = group["ids"][:]
        self.n_positions = group["n_positions"][:]
        self.columns = _table_columns(table, columns, self.ids) if columns else {}
        self.stats = None
        if normalize:
            mean, std = normalization(self.path, kind, save=save_stats)
            self.stats = (mean[self.positions], std[self.positions, None])  # (L, H), (L, 1)
        self._group = None

    def __getstate__(self) -> dict:  # handed to a worker process: without the open group
        return {**self.__dict__, "_group": None}

    def set_epoch(self, epoch: int) -> None:
        """A new shuffle order for the next pass (as DistributedSampler.set_epoch)."""
        self.epoch = epoch

    def __len__(self) -> int:
        return self.rows if self.kind == "pooled" else int(self.n_positions.sum())

    def chunk_order(self) -> np.ndarray:
        """This worker's chunks, in the order it reads them."""
        chunks = np.arange(-(-self.rows // self.chunk_rows))
        if self.shuffle:
            chunks = np.random.default_rng([self.seed, self.epoch]).permutation(chunks)
        worker = get_worker_info()
        return chunks if worker is None else chunks[worker.id :: worker.num_workers]

    def _read(self, chunk: int) -> dict[str, np.ndarray]:
        """One chunk's samples (all of them, in store order): x (n, L, H) float32, id, position."""
        if self._group is None:
            self._group = open_store(self.path)
        lo, hi = chunk * self.chunk_rows, min(self.rows, (chunk + 1) * self.chunk_rows)
        if self.kind == "pooled":
            x = self._group["pooled"][lo:hi][:, self.positions]  # (n, L, H)
            rows, position = np.arange(lo, hi), np.full(hi - lo, -1)
        else:
            tokens = self._group["tokens"]  # (N, T, L, H), a chunk per layer: read only the chosen ones
            states = np.stack([tokens[lo:hi, :, p] for p in self.positions], axis=2)  # (n, T, L, H)
            keep = np.arange(states.shape[1])[None] < self.n_positions[lo:hi, None]  # (n, T): not padding
            row, position = np.nonzero(keep)
            x, rows = states[row, position].astype(np.float32), lo + row
        if self.stats is not None:
            x = (x - self.stats[0]) / self.stats[1]
        return {"x": x.astype(np.float32, copy=False), "id": self.ids[rows], "position": position, "_row": rows}

    def __iter__(self) -> Iterator[dict]:
        rng = np.random.default_rng([self.seed, self.epoch, 1 + (get_worker_info() or _Main).id])
        pending: list[dict] = []
        for chunk in self.chunk_order():
            samples = self._read(chunk)
            if self.shuffle:  # within the chunk, in memory: the read stayed sequential
                order = rng.permutation(len(samples["x"]))
                samples = {k: v[order] for k, v in samples.items()}
            if self.batch_size is None:
                yield from self._samples(samples)
                continue
            pending.append(samples)
            while sum(len(p["x"]) for p in pending) >= self.batch_size:
                batch, pending = _take(pending, self.batch_size)
                yield self._batch(batch)
        if pending and self.batch_size is not None:
            yield self._batch({k: np.concatenate([p[k] for p in pending]) for k in pending[0]})

    def _samples(self, samples: dict) -> Iterator[dict]:
        for i in range(len(samples["x"])):
            row = samples["_row"][i]
            yield {
                "x": torch.from_numpy(samples["x"][i]),
                "id": int(samples["id"][i]),
                "position": int(samples["position"][i]),
                **{name: values[row] for name, values in self.columns.items()},
            }

    def _batch(self, samples: dict) -> dict:
        return {
            "x": torch.from_numpy(samples["x"]),
            "id": torch.from_numpy(samples["id"]),
            "position": torch.from_numpy(samples["position"]),
            **{name: [values[r] for r in samples["_row"]] for name, values in self.columns.items()},
        }


class _Main:
    id = -1  # the stream of the main process (no worker)


def _take(pending: list[dict], n: int) -> tuple[dict, list[dict]]:
    """The first n samples of the pending chunks, and what is left."""
    joined = {k: np.concatenate([p[k] for p in pending]) for k in pending[0]}
    return {k: v[:n] for k, v in joined.items()}, [{k: v[n:] for k, v in joined.items()}]


def _table_columns(table: str | Path | pl.DataFrame | None, columns: Sequence[str], ids: np.ndarray) -> dict[str, list]:
    """Columns of the row table beside a store (a Parquet file or its rows), checked to hold the store's rows in order."""
    if table is None:
        raise ValueError("columns were asked for without the row table (table=...)")
    wanted = ["id", *[c for c in columns if c != "id"]]
    frame = table.select(wanted) if isinstance(table, pl.DataFrame) else read_parquet(table, columns=wanted)
    if not np.array_equal(frame["id"].to_numpy(), ids):
        name = "the row table" if isinstance(table, pl.DataFrame) else table
        raise ValueError(f"{name}: row ids differ from the store's: the table and the store are out of step")
    return {name: frame[name].to_list() for name in columns}


def pooled_vectors(store: str | Path, layer: int) -> np.ndarray:
    """`(N, H)` pooled vectors of one layer, in store order, read through the dataset chunk by chunk."""
    data = StoreDataset(store, [layer], shuffle=False, batch_size=4096)
    return np.concatenate([batch["x"][:, 0].numpy() for batch in data])


def normalization(store: str | Path, kind: str = "pooled", save: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Per layer: the mean vector `(L, H)` and the RMS deviation per dimension `(L,)` of every sample
    of `kind` (see the module doc); read from the store's attributes, or computed in one pass over
    its chunks and (with `save`) written there."""
    path = store_location(store)
    kept = store_attrs(path).normalization or {}
    saved = kept.get(kind)
    if saved is not None:
        return np.asarray(saved.mean, dtype=np.float32), np.asarray(saved.std, dtype=np.float32)
    every = StoreDataset(path, kind=kind, shuffle=False)  # all layers, store order, raw
    total, squares, count = 0.0, 0.0, 0
    for chunk in every.chunk_order():
        x = every._read(chunk)["x"].astype(np.float64)  # (n, L, H)
        total, squares, count = total + x.sum(0), squares + (x**2).sum((0, 2)), count + len(x)
    mean = total / count  # (L, H)
    hidden = mean.shape[1]
    # E ||x - mean||^2 / H = (E ||x||^2 - ||mean||^2) / H
    std = np.sqrt(np.maximum(squares / count - (mean**2).sum(1), 0) / hidden)
    mean, std = mean.astype(np.float32), std.astype(np.float32)
    if save:
        stats = {"layers": every.layers, "mean": mean.tolist(), "std": std.tolist(), "samples": count}
        _set_attribute(path, "normalization", {**{k: v.model_dump() for k, v in kept.items()}, kind: stats})
    return mean, std


def _set_attribute(store: Path | str, key: str, value) -> None:
    """Set one attribute of a store by replacing its zarr.json whole (a crash never leaves half a file;
    on object storage one PUT replaces the object whole)."""
    fs, root = filesystem(store)
    metadata = json.loads(fs.cat_file(f"{root}/zarr.json"))
    metadata.setdefault("attributes", {})[key] = value
    if is_url(store):
        fs.pipe_file(f"{root}/zarr.json", json.dumps(metadata, indent=2).encode())
        return
    with atomic_output(store / "zarr.json") as partial:
        partial.write_text(json.dumps(metadata, indent=2))
