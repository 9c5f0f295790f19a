"""The hidden-state store format (Zarr v3): create, open and read a store; nothing about filling one.

    pooled       (N, L, H) float32   mean over the positions the mode defines (padding excluded)
    tokens       (N, T, L, H) float16, optional: every pooled position, zeros where a row had fewer
    ids          (N,) int64          the row ids of the table beside the store
    n_positions  (N,) int32          positions in each mean
    attributes   format, complete, model (path, source, sha256), layers, mode, tokens, pooling, dtype, ...
                 (one typed model, `StoreAttrs` in latentlab/hidden/attrs.py, written and read by everyone)

Chunks of `batch_rows` rows sit inside shard files of `shard_rows` rows, so a store is a few files
(DVC hashes every file). Readers refuse a store whose `complete` attribute is not true.

Every chunk compressed with zstd (the default) carries a checksum of its content (and a shard's index
its CRC-32C), so a damaged file is found when it is read, not used: a read that fails names the store,
the array and the file (`StoreDamaged`), and `verify_store` (`latentlab info --verify`) reads every
chunk. Stores written before chunks carried checksums still open; only a decoding error or a damaged
index shows there.

A store is a local path or an fsspec URL (`s3://bucket/x.zarr`, `gs://...`): zarr opens URLs through
fsspec (zarr.storage.FsspecStore); credentials and endpoint come from the file system's usual
environment (for S3: AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL, or a profile).
"""

import itertools
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Literal

import fsspec
import polars as pl
import zarr
from zarr.codecs import BloscCodec, BytesCodec, Crc32cCodec, ShardingCodec, ZstdCodec
from zarr.core.group import GroupMetadata
from zarr.core.metadata.v3 import ArrayV3Metadata
from zarr.dtype import parse_dtype

from latentlab.hidden.attrs import FORMAT, StoreAttrs

# Hidden states are nearly incompressible noise (float mantissas), but per-token arrays hold zeros
# where a row had ended, and their sign/exponent bytes repeat. The codec is a writer's choice only:
# it is recorded in each array's metadata, so readers open stores written with any of them
# (benchmarks/label.py measures write time and bytes of each).
# zstd (the default) checks each chunk against its own checksum (XXH64 of the content, 4 bytes): hidden
# states compress so little that zstd stores them nearly raw, where a flipped bit would otherwise decode
# without error into a wrong value. Stores written with none or lz4 carry no chunk checksum (only their
# shard index has one): `verify_store` can find only what fails to decode there.
COMPRESSORS = {
    "none": (),  # raw chunks: no CPU spent, bytes = the arrays' size
    # byte-shuffled LZ4 (Blosc, one thread): the high bytes of each value compress, at memory speed
    "lz4": (BloscCodec(cname="lz4", clevel=5, shuffle="shuffle"),),
    # zstd level 1: shrinks the zeros after end-of-sequence as well as level 3 does, in half the time
    "zstd": (ZstdCodec(level=1, checksum=True),),
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
    attrs: StoreAttrs | dict,
    batch_rows: int,
    shard_rows: int,
    compression: Compression = "zstd",
) -> dict[str, GroupMetadata | ArrayV3Metadata]:
    """Every node of a store, by path ("" the group): pooled, ids, n_positions, and tokens when
    `width` (T) is given; the float arrays compressed with `compression` (the small integer arrays
    always with zstd); `attrs` a store's attributes (a plain dict: any group's). Nothing is read or written."""
    attributes = attrs.to_attributes() if isinstance(attrs, StoreAttrs) else attrs
    nodes = {
        "": GroupMetadata(attributes=attributes, zarr_format=3),
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
    """A store read-only, finished or not (for reports on it; readers of its data use `open_store`).
    Reading its arrays (`group[name][...]`) raises `StoreDamaged`, naming the store, the array and the
    damaged file, where zarr would raise a bare checksum or decompression error."""
    location = store_location(path)
    fs, root = filesystem(location)
    if not fs.exists(f"{root}/zarr.json"):
        raise FileNotFoundError(f"{path} is not a Zarr store (no zarr.json); run the stage that writes it")
    try:
        group = zarr.open_group(location, mode="r")
    except Exception as error:  # zarr raises JSON, type and value errors for damaged metadata
        raise ValueError(f"{path} is not a readable Zarr store: {path}/zarr.json: {error}") from None
    named = _NamedGroup(group._async_group)
    object.__setattr__(named, "_location", str(path))  # a frozen dataclass: the name as the user gave it
    return named


def open_store(path: str | Path) -> zarr.Group:
    """A finished store, read-only; a store that was never completed, or whose attributes do not read as
    `StoreAttrs`, is refused (the message names the store and the attribute)."""
    group = open_any_store(path)
    if group.attrs.get("complete") is not True:
        raise ValueError(f"{path} is incomplete (attribute complete is not true): a run did not finish")
    StoreAttrs.read(group.attrs, str(path))
    return group


def store_attrs(store: str | Path | zarr.Group) -> StoreAttrs:
    """The attributes of a store (a path or URL: a finished store, as `open_store`; or a group already open)."""
    group = open_store(store) if isinstance(store, (str, Path)) else store
    return StoreAttrs.read(group.attrs, getattr(group, "_location", "") or str(group.store_path))


class StoreDamaged(ValueError):
    """A chunk of a store does not read back (checksum, decompression, shard index); the message names
    the store, the array and, where it was found, the file."""


def _damaged(location: str, name: str, file: str, rows: tuple[int, int], error: Exception) -> StoreDamaged:
    return StoreDamaged(
        f"{location}: array {name!r} is damaged: its file {file} (rows {rows[0]}..{rows[1]}) does not read back "
        f"({type(error).__name__}: {error}); restore the store (`dvc pull` or `dvc checkout`) or rerun what wrote it"
    )


def _shard_file(location: str, array: zarr.Array, shard: tuple[int, ...]) -> str:
    return f"{location.rstrip('/')}/{array.basename}/{array.metadata.encode_chunk_key(shard)}"


def chunk_regions(array: zarr.Array, lo: int = 0, hi: int | None = None) -> Iterator[tuple[tuple[int, ...], tuple]]:
    """(shard coordinates, region) of every chunk of `array` whose rows meet `lo..hi`, in file order:
    each region is read alone (one chunk decoded, its shard named by the coordinates)."""
    shape = array.shape
    if not shape:
        yield (), ()
        return
    hi = shape[0] if hi is None else hi
    chunk, shard = array.chunks, array.shards or array.chunks
    first, last = lo // chunk[0], -(-hi // chunk[0])
    grids = [range(first, last), *(range(-(-n // c)) for n, c in zip(shape[1:], chunk[1:]))]
    for index in itertools.product(*grids):
        region = tuple(slice(i * c, min(n, (i + 1) * c)) for i, c, n in zip(index, chunk, shape))
        yield tuple(r.start // s for r, s in zip(region, shard)), region


def _rows(array: zarr.Array, shard: tuple[int, ...]) -> tuple[int, int]:
    """The rows (axis 0) the shard file at `shard` holds."""
    if not shard:
        return 0, 1
    rows = (array.shards or array.chunks)[0]
    return shard[0] * rows, min(array.shape[0], (shard[0] + 1) * rows)


def find_damaged(location: str, name: str, array: zarr.Array, lo: int = 0, hi: int | None = None) -> None:
    """Read every chunk of `array` within rows `lo..hi`, one at a time; the first that fails is raised
    as `StoreDamaged`, naming its file."""
    for shard, region in chunk_regions(array, lo, hi):
        try:
            zarr.Array.get_basic_selection(array, region)
        except Exception as error:  # checksum (ValueError), decompression (RuntimeError), index, ...
            raise _damaged(location, name, _shard_file(location, array, shard), _rows(array, shard), error) from error


def _selected_rows(selection, rows: int) -> tuple[int, int]:
    """The span of rows (axis 0) a selection touches, as far as it can be told; else every row."""
    first = selection[0] if isinstance(selection, tuple) and selection else selection
    if isinstance(first, slice):
        start, stop, step = first.indices(rows)
        return (start, stop) if step == 1 and start < stop else (0, rows)
    if isinstance(first, int):
        first = first + rows if first < 0 else first
        return first, first + 1
    return 0, rows


class _NamedArray(zarr.Array):
    """An array of a store whose failed reads name the store, the array and the damaged file."""

    _location: str = ""

    def _read(self, read: Callable, selection, *args, **kwargs):
        try:
            return read(selection, *args, **kwargs)
        except (IndexError, TypeError, KeyError):  # a wrong selection, not a damaged store
            raise
        except Exception as error:
            rows = _selected_rows(selection, self.shape[0]) if self.shape else (0, 1)
            find_damaged(self._location, self.basename, self, *rows)  # raises, naming the file
            raise StoreDamaged(  # every chunk read back alone: the failure was not in one of them
                f"{self._location}: array {self.basename!r} could not be read (rows {rows[0]}..{rows[1]}): "
                f"{type(error).__name__}: {error}; `latentlab info --verify {self._location}` checks every chunk"
            ) from error

    def get_basic_selection(self, selection=Ellipsis, *args, **kwargs):
        return self._read(super().get_basic_selection, selection, *args, **kwargs)

    def get_orthogonal_selection(self, selection, *args, **kwargs):
        return self._read(super().get_orthogonal_selection, selection, *args, **kwargs)

    def get_coordinate_selection(self, selection, *args, **kwargs):
        return self._read(super().get_coordinate_selection, selection, *args, **kwargs)

    def get_mask_selection(self, selection, *args, **kwargs):
        return self._read(super().get_mask_selection, selection, *args, **kwargs)

    def get_block_selection(self, selection, *args, **kwargs):
        return self._read(super().get_block_selection, selection, *args, **kwargs)


class _NamedGroup(zarr.Group):
    """A store's group (read-only) whose arrays name the store and the damaged file when a read fails."""

    _location: str = ""

    def __getitem__(self, path: str):
        node = super().__getitem__(path)
        if isinstance(node, zarr.Array):
            node = _NamedArray(node._async_array)
            node._location = self._location
        return node


def verify_store(path: str | Path, progress: Callable | None = None) -> dict:
    """Read back every chunk of every array of a store, array by array and chunk by chunk (one chunk in
    memory at a time); the first that fails is raised as `StoreDamaged`, naming the store, the array and
    its file. `progress(total)` gives a bar to advance by one per chunk. Returns what was read:
    arrays, chunks, and whether the chunks carry checksums (else only decoding errors can show)."""
    group = open_any_store(path)
    arrays = sorted(group.arrays())
    total = sum(array.nchunks for _, array in arrays)
    bar = progress(total) if progress is not None else None
    try:
        for name, array in arrays:
            for shard, region in chunk_regions(array):
                try:
                    zarr.Array.get_basic_selection(array, region)
                except Exception as error:  # checksum (ValueError), decompression (RuntimeError), index, ...
                    file = _shard_file(str(path), array, shard)
                    raise _damaged(str(path), name, file, _rows(array, shard), error) from error
                if bar is not None:
                    bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    checksums = all(_checksummed(array) for _, array in arrays)
    return {"arrays": len(arrays), "chunks": total, "checksums": checksums}


def _checksummed(array: zarr.Array) -> bool:
    """Whether each chunk of `array` carries a checksum (crc32c, or zstd's own)."""
    codecs = array.metadata.codecs
    if codecs and isinstance(codecs[0], ShardingCodec):
        codecs = codecs[0].codecs  # the chunks' own (the shard index always has its crc32c)
    return any(isinstance(c, Crc32cCodec) or (isinstance(c, ZstdCodec) and c.checksum) for c in codecs)


def is_hidden_store(location: str | Path) -> bool:
    """A hidden-state store of this format (its zarr.json a group with `format` = FORMAT), finished or not."""
    fs, root = filesystem(store_location(location))
    try:
        metadata = json.loads(fs.cat_file(f"{root}/zarr.json"))
    except Exception:  # absent, a file, unreadable, not JSON
        return False
    return (
        isinstance(metadata, dict)
        and metadata.get("node_type") == "group"
        and (metadata.get("attributes") or {}).get("format") == FORMAT
    )


ROW_TABLE_KEY = "latentlab"  # Parquet key-value metadata of row tables written without `n_positions` (npz import)


def is_row_table(location: str | Path) -> bool:
    """A row table of a store, as latentlab writes them beside stores: a Parquet file with an `id` column
    and `n_positions` (label, extract) or the `latentlab` key in its metadata (npz import)."""
    try:
        with fsspec.open(str(location), "rb") as file:  # local paths too; only the footer is read
            schema = pl.read_parquet_schema(file)
            file.seek(0)
            metadata = pl.read_parquet_metadata(file)
    except Exception:  # absent, a directory, not Parquet
        return False
    return "id" in schema and ("n_positions" in schema or ROW_TABLE_KEY in metadata)


def layer_position(group: zarr.Group, layer: int) -> int:
    """Where `layer`, as it was asked for (e.g. -1), sits along the L axis of a store's arrays."""
    layers = store_attrs(group).layers
    if layer not in layers:
        raise ValueError(f"layer {layer} is not in {group.store_path} (it holds layers {layers})")
    return layers.index(layer)
