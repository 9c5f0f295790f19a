"""The hidden-state store format (Zarr v3): create, open and read a store; nothing about filling one.

    pooled       (N, L, H) float32   mean over the positions the mode defines (padding excluded)
    tokens       (N, T, L, H) float16, optional: every pooled position, zeros where a row had fewer
    ids          (N,) int64          the row ids of the table beside the store
    n_positions  (N,) int32          positions in each mean
    attributes   format, complete, model (path, source, sha256), layers, mode, tokens, pooling, dtype, ...

Chunks of `batch_rows` rows sit inside shard files of `shard_rows` rows, so a store is a few files
(DVC hashes every file). Readers refuse a store whose `complete` attribute is not true.

A store is a local path or an fsspec URL (`s3://bucket/x.zarr`, `gs://...`): zarr opens URLs through
fsspec (zarr.storage.FsspecStore); credentials and endpoint come from the file system's usual
environment (for S3: AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL, or a profile).
"""

from pathlib import Path
from typing import Literal

import fsspec
import polars as pl
import zarr
from zarr.codecs import BloscCodec, BytesCodec, ShardingCodec, ZstdCodec
from zarr.core.group import GroupMetadata
from zarr.core.metadata.v3 import ArrayV3Metadata
from zarr.dtype import parse_dtype

FORMAT = "latentlab.hidden/1"
# Hidden states are nearly incompressible noise (float mantissas), but per-token arrays hold zeros
# where a row had ended, and their sign/exponent bytes repeat. The codec is a writer's choice only:
# it is recorded in each array's metadata, so readers open stores written with any of them
# (benchmarks/label.py measures write time and bytes of each).
COMPRESSORS = {
    "none": (),  # raw chunks: no CPU spent, bytes = the arrays' size
    # byte-shuffled LZ4 (Blosc, one thread): the high bytes of each value compress, at memory speed
    "lz4": (BloscCodec(cname="lz4", clevel=5, shuffle="shuffle"),),
    # zstd level 1: shrinks the zeros after end-of-sequence as well as level 3 does, in half the time
    "zstd": (ZstdCodec(level=1),),
}
Compression = Literal["none", "lz4", "zstd"]


def rows_array_metadata(
    shape: tuple,
    dtype,
    batch_rows: int,
    shard_rows: int,
    chunk_tail: tuple | None = None,
    compression: Compression = "zstd",
) -> ArrayV3Metadata:
    """The metadata of an array chunked along N: `batch_rows`-row chunks (of `chunk_tail` beyond N,
    default: whole rows) inside `shard_rows`-row shard files, each chunk compressed with `compression`
    (COMPRESSORS). Built here, without touching storage: the same document `create_array` writes
    (tests/test_label_store.py compares them byte for byte)."""
    shape, rest = tuple(shape), tuple(shape[1:])
    codecs = (BytesCodec(), *COMPRESSORS[compression])
    if rest:  # batch-row chunks inside one shard file per `shard_rows` rows
        codecs = (ShardingCodec(chunk_shape=(batch_rows, *(chunk_tail or rest)), codecs=codecs),)
    # 1-D: one plain chunk per shard is already one file per shard
    return ArrayV3Metadata(
        shape=shape,
        data_type=parse_dtype(dtype, zarr_format=3),
        chunk_grid={"name": "regular", "configuration": {"chunk_shape": (shard_rows, *rest)}},
        chunk_key_encoding={"name": "default", "configuration": {"separator": "/"}},
        fill_value=0,
        codecs=codecs,
        attributes={},
        dimension_names=None,
    )


def add_array(group: zarr.Group, name: str, metadata: ArrayV3Metadata) -> zarr.Array:
    """A new array `name` in `group`, laid out as `metadata` (`rows_array_metadata`) says."""
    path = f"{group.path}/{name}".lstrip("/")
    return dict(zarr.create_hierarchy(store=group.store, nodes={path: metadata}))[path]


def store_metadata(
    rows: int,
    layers: int,
    hidden: int,
    width: int | None,
    attrs: dict,
    batch_rows: int,
    shard_rows: int,
    compression: Compression = "zstd",
) -> dict[str, GroupMetadata | ArrayV3Metadata]:
    """Every node of a store, by path ("" the group): pooled, ids, n_positions, and tokens when
    `width` (T) is given; the float arrays compressed with `compression` (the small integer arrays
    always with zstd). Nothing is read or written."""
    nodes = {
        "": GroupMetadata(attributes=attrs, zarr_format=3),
        "pooled": rows_array_metadata((rows, layers, hidden), "float32", batch_rows, shard_rows, None, compression),
        "ids": rows_array_metadata((rows,), "int64", batch_rows, shard_rows),
        "n_positions": rows_array_metadata((rows,), "int32", batch_rows, shard_rows),
    }
    if width is not None:
        # a chunk per layer: reading one layer's tokens reads only that layer
        nodes["tokens"] = rows_array_metadata(
            (rows, width, layers, hidden), "float16", batch_rows, shard_rows, (width, 1, hidden), compression
        )
    return nodes


def write_store(path: str | Path, nodes: dict[str, GroupMetadata | ArrayV3Metadata]) -> dict:
    """A new, empty store at `path` (whatever was there is replaced) holding `nodes`
    (`store_metadata`): every metadata document written at once, concurrently. Returns the nodes
    open (the group at "")."""
    return dict(zarr.create_hierarchy(store=_zarr_store(path), nodes=nodes, overwrite=True))


def store_arrays(path: str | Path, nodes: dict[str, GroupMetadata | ArrayV3Metadata]) -> dict[str, zarr.Array]:
    """The arrays of the store `write_store(path, nodes)` wrote, open for writing, from `nodes`:
    nothing is read (opening reads each array's metadata document)."""
    store = _zarr_store(path)
    return {
        name: zarr.Array(zarr.AsyncArray(metadata=node, store_path=zarr.storage.StorePath(store, name)))
        for name, node in nodes.items()
        if isinstance(node, ArrayV3Metadata)
    }


def _zarr_store(path: str | Path) -> zarr.abc.store.Store:
    """What zarr opens at `path` (a local path or an fsspec URL), writable."""
    if is_url(path):
        return zarr.storage.FsspecStore.from_url(str(path), read_only=False)
    return zarr.storage.LocalStore(path, read_only=False)


def is_url(location: str | Path) -> bool:
    """An fsspec URL (`s3://bucket/x.zarr`), not a local path."""
    return "://" in str(location)


def store_location(location: str | Path) -> str | Path:
    """What zarr and fsspec open: a URL as it is (a Path would mangle `s3://`), a local path as a Path."""
    return str(location) if is_url(location) else Path(location)


def filesystem(location: str | Path) -> tuple[fsspec.AbstractFileSystem, str]:
    """The fsspec file system `location` lives on and its path there (local paths too)."""
    return fsspec.core.url_to_fs(str(location))


def read_parquet(location: str | Path, columns: list[str] | None = None) -> pl.DataFrame:
    """A Parquet file (e.g. the row table beside a store) at a local path or an fsspec URL."""
    if not is_url(location):
        return pl.read_parquet(location, columns=columns)
    with fsspec.open(str(location), "rb") as file:
        return pl.read_parquet(file, columns=columns)


def open_any_store(path: str | Path) -> zarr.Group:
    """A store read-only, finished or not (for reports on it; readers of its data use `open_store`)."""
    path = store_location(path)
    fs, root = filesystem(path)
    if not fs.exists(f"{root}/zarr.json"):
        raise FileNotFoundError(f"{path} is not a Zarr store (no zarr.json); run the stage that writes it")
    try:
        return zarr.open_group(path, mode="r")
    except Exception as error:  # zarr raises JSON, type and value errors for damaged metadata
        raise ValueError(f"{path} is not a readable Zarr store: {path}/zarr.json: {error}") from None


def open_store(path: str | Path) -> zarr.Group:
    """A finished store, read-only; a store that was never completed is refused."""
    group = open_any_store(path)
    if group.attrs.get("complete") is not True:
        raise ValueError(f"{path} is incomplete (attribute complete is not true): a run did not finish")
    return group


def layer_position(group: zarr.Group, layer: int) -> int:
    """Where `layer`, as it was asked for (e.g. -1), sits along the L axis of a store's arrays."""
    layers = group.attrs["layers"]
    if layer not in layers:
        raise ValueError(f"layer {layer} is not in {group.store_path} (it holds layers {layers})")
    return layers.index(layer)
