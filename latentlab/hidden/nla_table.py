"""The NLA table: `prompt, response, activation_vector` (the reference format), one row per labelled problem.

    id                 int64
    prompt             string     the problem, e.g. "12+7="
    response           string     the text the vector was computed from, e.g. "12+7=19\\n3+4=" (the
                                  problem and what the base model generated after it)
    activation_vector  fixed_size_list<float32>[d]   the pooled hidden state of one layer

`write_nla_table` streams it from a finished hidden-state store in row groups of `rows_per_group`
rows (memory flat in the number of rows); `read_nla_table` checks the schema and returns the vectors
as one `(N, d)` numpy array viewing the Arrow buffer.
"""

from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from latentlab.common.atomic import atomic_output
from latentlab.common.errors import InputError
from latentlab.common.tables import TableWriter, read_checked, vector_type, vectors
from latentlab.hidden.dataset import StoreDataset
from latentlab.hidden.store import open_store

VECTOR = "activation_vector"


def nla_schema(dim: int) -> pa.Schema:
    return pa.schema(
        [("id", pa.int64()), ("prompt", pa.string()), ("response", pa.string()), (VECTOR, vector_type(dim))]
    )


def write_nla_table(
    rows: pl.DataFrame, store: str | Path, layer: int, path: str | Path, rows_per_group: int = 1024
) -> int:
    """rows (`id, prompt` and `text_generated` when the store generated) + one layer of the store -> `path`.

    The response is the text the vector was pooled over: prompt + generated text in generate mode,
    the prompt alone in prompt mode. Returns the vector dimension.
    """
    group = open_store(store)
    if group.attrs["rows"] != rows.height:
        raise ValueError(f"{store} has {group.attrs['rows']} rows, the table beside it {rows.height}")
    generated = "text_generated" in rows.columns and group.attrs["mode"] == "generate"
    columns = ["prompt", "text_generated"] if generated else ["prompt"]
    # in store order, `rows_per_group` rows a batch; the dataset checks that the ids are the table's
    data = StoreDataset(store, [layer], table=rows, columns=columns, shuffle=False, batch_size=rows_per_group)
    dim = group["pooled"].shape[-1]
    with atomic_output(path) as partial, TableWriter(partial, nla_schema(dim)) as writer:
        for batch in data:
            prompts = batch["prompt"]
            texts = batch["text_generated"] if generated else [""] * len(prompts)
            writer.write(
                {
                    "id": batch["id"].tolist(),
                    "prompt": prompts,
                    "response": [p + t for p, t in zip(prompts, texts)],
                    VECTOR: np.ascontiguousarray(batch["x"][:, 0].numpy()),
                }
            )
    return dim


def read_nla_table(path: str | Path) -> tuple[pa.Table, np.ndarray]:
    """(the table, its vectors `(N, d)` float32); a file of another schema is refused, naming the column."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path} does not exist (run `dvc repro label`)")
    schema = pq.read_schema(path)
    field = schema.field(VECTOR) if VECTOR in schema.names else None
    dim = field.type.list_size if field is not None and pa.types.is_fixed_size_list(field.type) else 1
    table = read_checked(path, nla_schema(dim))  # the dimension is the file's; every type is checked
    return table, vectors(table, VECTOR)
