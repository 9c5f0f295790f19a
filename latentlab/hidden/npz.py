"""The reference pipeline's NPZ files, in and out of hidden-state stores.

Reference keys: `obs, next_obs, action, reward, done, log_prob` (transitions), `text_generated`
(one string per row) and `hidden_state (N, T, H)` float32, one layer's states of every position.
Export also writes `n_positions (N,)` (how many of the T positions hold states; the reference
averaged all T, padding included), and import honours it when present.

No pickle: text is written as fixed-width unicode and every file is read with allow_pickle=False.
"""

import zipfile
from pathlib import Path

import numpy as np
import polars as pl
import zarr

from latentlab.common.atomic import atomic_output
from latentlab.common.errors import InputError
from latentlab.hidden.attrs import ModelInfo, StoreAttrs
from latentlab.hidden.store import (
    ROW_TABLE_KEY,
    add_array,
    is_hidden_store,
    is_row_table,
    layer_position,
    open_store,
    read_parquet,
    rows_array_metadata,
    store_attrs,
    store_metadata,
    write_store,
)

TRANSITION_KEYS = ("obs", "next_obs", "action", "reward", "done", "log_prob")
REFERENCE_KEYS = (*TRANSITION_KEYS, "text_generated", "hidden_state")


def _is_text(array: np.ndarray) -> bool:
    return array.dtype.kind in "US"


def export_npz(
    store: str | Path,
    out: str | Path,
    table: str | Path | None = None,
    layer: int | None = None,
    transitions: str | Path | None = None,
) -> list[str]:
    """Write `store` (one layer: `layer` as it was asked for, default the last) and the row table's
    text as a reference NPZ; returns the keys written. `transitions`: a Zarr group holding the
    transition arrays (e.g. data/grid/transitions.zarr) with the same `ids` as the store."""
    group = open_store(store)
    source = None
    if transitions is not None:
        source = zarr.open_group(transitions, mode="r")
        if not np.array_equal(source["ids"][:], group["ids"][:]):
            raise ValueError(f"{transitions} and {store} do not hold the same rows (ids differ)")
    j = layer_position(group, store_attrs(group).layers[-1] if layer is None else layer)
    # per-position states when stored; else the pooled vector as a single position, which the
    # reference's mean over dim 1 turns back into the same vector
    hidden = group["tokens"][:, :, j] if "tokens" in group else group["pooled"][:, j][:, None]
    # how many of the file's T positions hold states: a pooled vector is one (import reads it back as one)
    counts = group["n_positions"][:] if "tokens" in group else np.ones(len(hidden), dtype=np.int32)
    arrays = {"hidden_state": hidden.astype(np.float32), "n_positions": counts}
    rows = read_parquet(table) if table is not None else pl.DataFrame()
    for key in TRANSITION_KEYS:
        if key in group:
            arrays[key] = group[key][:]
        elif source is not None and key in source:
            arrays[key] = source[key][:]
        elif key in rows.columns:
            arrays[key] = np.array(rows[key].to_list(), dtype=str if rows[key].dtype == pl.String else None)
    if "obs" not in arrays and "prompt" in rows.columns:  # text observations: the prompts
        arrays["obs"] = np.array(rows["prompt"].to_list(), dtype=str)
    if "text_generated" in rows.columns:
        arrays["text_generated"] = np.array(rows["text_generated"].to_list(), dtype=str)
    # a file object: savez adds no suffix; only an .npz archive is replaced, never another file
    with atomic_output(out, replaces=is_npz_archive, what=ARCHIVE) as partial, open(partial, "wb") as file:
        np.savez(file, **arrays)
    return list(arrays)


NPY_MAGIC = b"\x93NUMPY"
ZIP_MAGIC = b"PK\x03\x04"
ARCHIVE = "an .npz archive (a zip file of .npy arrays)"


def is_npz_archive(path: str | Path) -> bool:
    """A file `np.savez` could have written: a zip archive whose members are all .npy arrays."""
    path = Path(path)
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except (OSError, zipfile.BadZipFile):  # absent, a directory, not a zip file
        return False
    return path.is_file() and all(name.endswith(".npy") for name in names)


def _load(path: Path) -> dict[str, np.ndarray]:
    """Every array of an NPZ archive, never unpickling; a file that is not one is named and described."""
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist")
    with open(path, "rb") as file:
        head = file.read(6)
    if head.startswith(NPY_MAGIC):
        raise InputError(f"{path} is a .npy file (one unnamed array); import needs an .npz archive of named arrays")
    if not head.startswith(ZIP_MAGIC):
        raise InputError(f"{path} is not an .npz archive (np.savez writes a zip file); latentlab never loads pickles")
    arrays = {}
    try:
        with np.load(path, allow_pickle=False) as data:
            for key in data.files:
                try:
                    arrays[key] = data[key]
                except ValueError as error:  # an object array: it would need pickle
                    raise InputError(
                        f"{path}: {key} is an object array, which needs pickle to load; save text as "
                        "fixed-width unicode (np.array(texts, dtype=str))"
                    ) from error
    except (OSError, zipfile.BadZipFile, EOFError) as error:
        raise InputError(f"{path} is a damaged .npz archive: {error}") from error
    return arrays


def _checked(path: Path, arrays: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """The hidden states (N, T, H) and positions per row (N,) after checking every shape, dtype and range."""
    if "hidden_state" not in arrays:
        raise InputError(f"{path} has no hidden_state (it has {sorted(arrays)})")
    hidden = arrays.pop("hidden_state")
    if hidden.dtype.kind not in "fiu":
        raise InputError(f"{path}: hidden_state must be numeric (N, T, H) or (N, H), got dtype {hidden.dtype}")
    if hidden.ndim not in (2, 3) or 0 in hidden.shape:
        raise InputError(f"{path}: hidden_state must be (N, T, H) or (N, H) and not empty, got shape {hidden.shape}")
    hidden = hidden[:, None] if hidden.ndim == 2 else hidden  # (N, H): already pooled, one position
    if not np.isfinite(hidden).all():
        bad = np.flatnonzero(~np.isfinite(hidden).all(axis=(1, 2)))
        raise InputError(f"{path}: hidden_state has NaN or inf values in {bad.size} rows (first: {bad[:5].tolist()})")
    rows, width = hidden.shape[:2]
    wrong = {k: a.shape for k, a in arrays.items() if a.shape[:1] != (rows,)}
    if wrong:
        raise InputError(f"{path}: arrays must all have {rows} rows like hidden_state; these do not: {wrong}")
    counts = arrays.pop("n_positions", np.full(rows, width))
    if counts.dtype.kind not in "iu" or counts.ndim != 1:
        raise InputError(f"{path}: n_positions must be integers (N,), got dtype {counts.dtype}, shape {counts.shape}")
    bad = np.flatnonzero((counts < 1) | (counts > width))
    if bad.size:
        raise InputError(
            f"{path}: n_positions must lie in 1..{width} (hidden_state's T); rows {bad[:5].tolist()} hold "
            f"{counts[bad[:5]].tolist()}"
        )
    return hidden, counts.astype(np.int32)


def import_npz(
    path: str | Path,
    store: str | Path,
    table: str | Path | None = None,
    layer: int = -1,
    batch_rows: int = 256,
    shard_rows: int = 1024,
) -> int:
    """A reference NPZ as a store (`pooled`, `tokens`, and the numeric transition arrays) plus a row
    table (`id`, `text_generated` and any text arrays); `layer` records which layer it held. Returns N."""
    path = Path(path)
    arrays = _load(path)
    hidden, counts = _checked(path, arrays)
    rows, width, size = hidden.shape
    keep = np.arange(width)[None] < counts[:, None]
    pooled = (hidden * keep[..., None]).sum(1, dtype=np.float64) / np.maximum(counts, 1)[:, None]
    attrs = StoreAttrs(  # no extraction settings: the file does not say how its states were made
        complete=True,
        model=ModelInfo(source=f"imported from {path.name}"),
        layers=[layer],
        mode="imported",
        tokens=width,
        pooling="mean",  # the reference's: `pooled` is the mean of the file's positions, computed above
        positions="the first n_positions of the file's T positions (all T without n_positions)",
        dtype=str(hidden.dtype),
        hidden_size=size,
        rows=rows,
    )
    shard_rows = max(batch_rows, shard_rows // batch_rows * batch_rows)
    with atomic_output(store, replaces=is_hidden_store, what="a hidden-state store") as partial:
        group = write_store(partial, store_metadata(rows, 1, size, width, attrs, batch_rows, shard_rows))[""]
        group["pooled"][:] = pooled[:, None].astype(np.float32)
        group["tokens"][:] = hidden[:, :, None].astype(np.float16)
        group["ids"][:] = np.arange(rows)
        group["n_positions"][:] = counts
        for key, array in arrays.items():
            if not _is_text(array):
                add_array(group, key, rows_array_metadata(array.shape, array.dtype, batch_rows, shard_rows))[:] = array
    if table is not None:
        text = {k: a.tolist() for k, a in arrays.items() if _is_text(a)}
        with atomic_output(table, replaces=is_row_table, what="a row table of a store") as partial:
            frame = pl.DataFrame({"id": np.arange(rows), **text})
            frame.write_parquet(
                partial, metadata={ROW_TABLE_KEY: f"rows of {Path(store).name}, imported from {path.name}"}
            )
    return rows
