"""Parquet tables with a declared Arrow schema: written in streamed row groups, checked when read.

A vector column is an Arrow `fixed_size_list<float32>[d]`: every row holds exactly d floats, stored
back to back, so `vectors(table, name)` hands the column to numpy as one `(N, d)` array without a
copy per row (zero-copy when the column is one chunk, one concatenation otherwise).

    schema = pa.schema([("prompt", pa.string()), ("activation_vector", vector_type(64))])
    with TableWriter(path, schema) as writer:       # memory stays flat in the number of rows
        writer.write({"prompt": [...], "activation_vector": array_of_shape_(n, 64)})
    table = read_checked(path, schema)              # refused, naming the column, if it differs
    V = vectors(table, "activation_vector")         # (N, 64) float32
"""

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from latentlab.common.errors import InputError


def vector_type(dim: int) -> pa.DataType:
    """`fixed_size_list<float32>[dim]`: one fixed-length vector per row."""
    return pa.list_(pa.float32(), dim)


def vector_array(values: np.ndarray) -> pa.FixedSizeListArray:
    """`(N, d)` floats -> an Arrow array of N vectors of d float32 (no copy when already float32, C-order)."""
    values = np.ascontiguousarray(values, dtype=np.float32)
    if values.ndim != 2:
        raise ValueError(f"vectors must be (N, d), got shape {values.shape}")
    return pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(-1)), values.shape[1])


def record_batch(columns: dict, schema: pa.Schema) -> pa.RecordBatch:
    """A batch of `schema` from python lists / numpy arrays (a 2-D array becomes a vector column)."""
    arrays = []
    for field in schema:
        value = columns[field.name]
        if pa.types.is_fixed_size_list(field.type):
            arrays.append(vector_array(value))
        else:
            arrays.append(pa.array(value, type=field.type))
    return pa.RecordBatch.from_arrays(arrays, schema=schema)


class TableWriter:
    """A Parquet file of a declared schema written one row group per `write` (a `ParquetWriter`)."""

    def __init__(self, path: str | Path, schema: pa.Schema):
        self.schema = schema
        self._writer = pq.ParquetWriter(str(path), schema)

    def write(self, columns: dict) -> None:
        self._writer.write_batch(record_batch(columns, self.schema))

    def __enter__(self) -> "TableWriter":
        return self

    def __exit__(self, *exc) -> None:
        self._writer.close()


def check_schema(found: pa.Schema, expected: pa.Schema, path: str | Path) -> None:
    """Refuse a schema lacking a column of `expected` or holding it with another type; the message names it."""
    for field in expected:
        index = found.get_field_index(field.name)
        if index < 0:
            raise InputError(f"{path}: column {field.name!r} is missing (it has {found.names})")
        if not found.field(index).type.equals(field.type):
            raise InputError(f"{path}: column {field.name!r} has type {found.field(index).type}, expected {field.type}")


def read_checked(path: str | Path, schema: pa.Schema) -> pa.Table:
    """The columns of `schema` from a Parquet file, after checking the file's schema against it."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path} does not exist (run the stage that writes it, e.g. `dvc repro`)")
    check_schema(pq.read_schema(path), schema, path)
    table = pq.read_table(path, columns=schema.names)
    if table.num_rows == 0:
        raise InputError(f"{path} has no rows")
    return table


def vectors(table: pa.Table, name: str) -> np.ndarray:
    """A `fixed_size_list<float32>[d]` column as a read-only `(N, d)` float32 numpy array.

    The floats of a fixed-size list are one flat buffer; numpy views it without copying (a column
    of several chunks is first combined into one). Rows with an offset (a sliced table) are handled
    by `.flatten()`, which honours the slice.
    """
    column = table.column(name)
    if not pa.types.is_fixed_size_list(column.type):
        raise InputError(f"column {name!r} has type {column.type}, not a fixed-size list of float32")
    chunk = column.combine_chunks() if column.num_chunks != 1 else column.chunk(0)
    if isinstance(chunk, pa.ChunkedArray):
        chunk = chunk.chunk(0)
    flat = chunk.flatten().to_numpy(zero_copy_only=True)
    return flat.reshape(len(chunk), column.type.list_size)
