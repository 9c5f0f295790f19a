"""label: hidden states of the base LM over the problems -> data/hidden/<set>.zarr, data/labels/.

Per set in `label.datasets` (problem sets from data/synth; `grid`: the grid world's observation
texts from data/grid/texts.parquet): a Zarr store with `pooled (N, L, H)` (and `tokens (N, T, L, H)` with
`label.store_tokens`), and data/labels/<set>.parquet: the problems plus the generated text. Then
data/labels/nla.parquet, the NLA training table (prompt, response, activation_vector).

A killed run resumes from its last complete shard: work in progress lives in data/.partial/label,
outside the DVC outputs, and only complete stores are moved into data/hidden.
`torchrun --nproc_per_node N -m stages.label` splits the shards across N processes.
"""

from pathlib import Path

import polars as pl
import torch

from latentlab.common.atomic import atomic_output
from latentlab.common.distributed import distributed
from latentlab.common.inputs import read_table, require_model_dir
from latentlab.hidden.extract import Extractor
from latentlab.hidden.labelling import label, prepare
from latentlab.hidden.store import read_pooled
from latentlab.lm.modeling import describe_model, load_lm
from latentlab.tasks.arithmetic import PROBLEM_SCHEMA
from stages.common import GRID, MODELS, SYNTH, setup, stage

HIDDEN, LABELS, WORK = Path("data/hidden"), Path("data/labels"), Path("data/.partial/label")


def rows(name: str) -> pl.DataFrame:
    """The rows of a set: the problems, or the grid texts (id, prompt, episode, step)."""
    if name == "grid":
        return read_table(GRID / "texts.parquet", {"id": pl.Int64, "prompt": pl.String})
    return read_table(SYNTH / f"{name}.parquet", PROBLEM_SCHEMA)


@stage
def main(params):
    cfg = params.label
    with distributed() as ranks:
        run = setup(params)
        base = require_model_dir(MODELS / "base")
        model, tokenizer = load_lm(base, run.device, dtype=getattr(torch, cfg.dtype))
        extractor = Extractor(model, tokenizer, cfg)
        info = describe_model(base)
        # every set is checked (empty, too long for the context) before any is labelled
        jobs = [prepare(extractor, name, rows(name), cfg, params.seed, info) for name in cfg.datasets]
        for job in jobs:
            label(extractor, job, HIDDEN / f"{job.name}.zarr", LABELS / f"{job.name}.parquet", WORK / job.name, ranks)
        if ranks.rank == 0:
            write_nla_table(cfg)


def write_nla_table(cfg) -> None:
    """The reference NLA format; the response is the generated text, or the answer when nothing is generated."""
    rows = pl.read_parquet(LABELS / f"{cfg.nla_dataset}.parquet")
    vectors = read_pooled(HIDDEN / f"{cfg.nla_dataset}.zarr", cfg.nla_layer)
    table = rows.select("id", "prompt", response="text_generated" if cfg.tokens > 1 else "answer").with_columns(
        activation_vector=pl.Series(vectors, dtype=pl.List(pl.Float32))
    )
    with atomic_output(LABELS / "nla.parquet") as partial:
        table.write_parquet(partial)
    print(
        f"{LABELS / 'nla.parquet'}: {table.height} rows, activation_vector of layer {cfg.nla_layer} "
        f"({vectors.shape[1]} floats)"
    )


if __name__ == "__main__":
    main()
