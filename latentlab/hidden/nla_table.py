"""The NLA table: `prompt, response, activation_vector` (the reference format), one row per labelled problem.

    id                 int64
    prompt             string     the problem, e.g. "12+7="
    response           string     the text the vector was computed from, e.g. "12+7=19\\n3+4=" (the
                                  problem and what the base model generated after it)
    activation_vector  fixed_size_list<float32>[d]   the pooled hidden state of one layer

The table describes itself: the Arrow schema's metadata (key `latentlab.nla`, JSON) holds `NLATableInfo`: the
layer the vectors were read at, the store they came from, its model (path, source, content hash), pooling,
mode and tokens. Readers take these facts from the table, never from the params of the stage that wrote it.

`write_nla_table` streams it from a finished hidden-state store in row groups of `rows_per_group`
rows (memory flat in the number of rows); `read_nla_table` checks the schema and returns the vectors
as one `(N, d)` numpy array viewing the Arrow buffer; `nla_table_info` reads the metadata alone.
"""

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from latentlab.common.atomic import atomic_output
from latentlab.common.errors import InputError
from latentlab.common.tables import TableWriter, read_checked, vector_type, vectors
from latentlab.hidden.dataset import StoreDataset
from latentlab.hidden.store import open_store, store_attrs
from latentlab.lm.pooling import Pooling

VECTOR = "activation_vector"
INFO_KEY = b"latentlab.nla"


@dataclass(frozen=True)
class NLATableInfo:
    """What an NLA table's vectors are: where and how they were read."""

    layer: int  # output_hidden_states numbering: 0 embeddings, i the input of block i, -1 the final norm
    store: str  # the hidden-state store the vectors were read from
    model: dict  # the store's model: path, source, content sha256
    pooling: Pooling  # how each vector pools positions (the store's)
    mode: str  # prompt | generate | text | imported (the store's)
    tokens: int  # the store's tokens setting


def nla_schema(dim: int, info: NLATableInfo | None = None) -> pa.Schema:
    metadata = {INFO_KEY: json.dumps(asdict(info), sort_keys=True)} if info is not None else None
    return pa.schema(
        [("id", pa.int64()), ("prompt", pa.string()), ("response", pa.string()), (VECTOR, vector_type(dim))],
        metadata=metadata,
    )


def write_nla_table(
    rows: pl.DataFrame, store: str | Path, layer: int, path: str | Path, rows_per_group: int = 1024
) -> int:
    """rows (`id, prompt` and `text_generated` when the store generated) + one layer of the store -> `path`.

    The response is the text the vector was pooled over: prompt + generated text in generate mode,
    the prompt alone in prompt mode. Returns the vector dimension.
    """
    group = open_store(store)
    attrs = store_attrs(group)
    if attrs.rows != rows.height:
        raise ValueError(f"{store} has {attrs.rows} rows, the table beside it {rows.height}")
    generated = "text_generated" in rows.columns and attrs.mode == "generate"
    columns = ["prompt", "text_generated"] if generated else ["prompt"]
    # in store order, `rows_per_group` rows a batch; the dataset checks that the ids are the table's
    data = StoreDataset(store, [layer], table=rows, columns=columns, shuffle=False, batch_size=rows_per_group)
    dim = group["pooled"].shape[-1]
    info = NLATableInfo(
        layer=layer,
        store=str(store),
        model=attrs.model.model_dump(exclude_none=True),
        pooling=attrs.pooling,
        mode=attrs.mode,
        tokens=attrs.tokens,
    )
    with atomic_output(path) as partial, TableWriter(partial, nla_schema(dim, info)) as writer:
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
        raise InputError(f"{path} does not exist (run `dvc repro nla_table`)")
    schema = pq.read_schema(path)
    field = schema.field(VECTOR) if VECTOR in schema.names else None
    dim = field.type.list_size if field is not None and pa.types.is_fixed_size_list(field.type) else 1
    table = read_checked(path, nla_schema(dim))  # the dimension is the file's; every type is checked
    return table, vectors(table, VECTOR)


def nla_table_info(path: str | Path) -> NLATableInfo:
    """The facts the table carries about its vectors (module doc); a table written before it carried them is
    refused, naming what to rerun."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path} does not exist (run `dvc repro nla_table`)")
    raw = (pq.read_schema(path).metadata or {}).get(INFO_KEY)
    if raw is None:
        raise InputError(
            f"{path} does not say which layer its vectors are (written by an older version): rerun "
            "`dvc repro nla_table`"
        )
    return NLATableInfo(**json.loads(raw))
