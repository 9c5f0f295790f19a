"""label: hidden states of the base LM over the problems -> data/hidden/<set>.zarr, data/labels/.

Per set in `label.datasets` (problem sets from data/synth; `grid`: the grid world's observation
texts from data/grid/texts.parquet): a Zarr store with `pooled (N, L, H)` (and `tokens (N, T, L, H)` with
`label.store_tokens`), and data/labels/<set>.parquet: the problems plus the generated text. Then
data/labels/nla.parquet, the NLA training table (prompt, response, activation_vector), and
data/labels/nla_eval.parquet, the same for the held-out set.

A killed run resumes from its last complete shard: work in progress lives in data/.partial/label,
outside the DVC outputs, and only complete stores are moved into data/hidden.
`torchrun --nproc_per_node N -m stages.label` (or `launcher.nproc: N`) splits the shards across N processes.
"""

from pathlib import Path

import polars as pl

from latentlab.common.distributed import distributed
from latentlab.common.inputs import read_table, require_model_dir
from latentlab.hidden.labelling import LabelSet, label_sets
from latentlab.hidden.nla_table import write_nla_table
from latentlab.tasks.arithmetic import PROBLEM_SCHEMA
from stages.common import GRID, MODELS, SYNTH, check_layers, setup, stage

HIDDEN, LABELS, WORK = Path("data/hidden"), Path("data/labels"), Path("data/.partial/label")


def rows(name: str) -> pl.DataFrame:
    """The rows of a set: the problems, or the grid texts (id, prompt, episode, step)."""
    if name == "grid":
        return read_table(GRID / "texts.parquet", {"id": pl.Int64, "prompt": pl.String})
    return read_table(SYNTH / f"{name}.parquet", PROBLEM_SCHEMA)


@stage(torchrun=True)
def main(params):
    cfg = params.label
    with distributed() as ranks:
        run = setup(params)
        base = require_model_dir(MODELS / "base")
        check_layers(params, base, ("label.layers",))
        # the same run as `latentlab label`: every set is checked (empty, too long) before any is labelled
        sets = [
            LabelSet(name, rows(name), HIDDEN / f"{name}.zarr", LABELS / f"{name}.parquet", WORK / name)
            for name in cfg.datasets
        ]
        label_sets(base, sets, cfg, params.seed, run.device, ranks, params.prompt)
        if ranks.rank == 0:
            write_nla_tables(cfg)


def write_nla_tables(cfg) -> None:
    """The reference NLA format (prompt, response, activation_vector) for training and, held out, for evaluation."""
    for name, target in (
        (cfg.nla_dataset, LABELS / "nla.parquet"),
        (cfg.nla_eval_dataset, LABELS / "nla_eval.parquet"),
    ):
        if name is None:
            continue
        rows = pl.read_parquet(LABELS / f"{name}.parquet")
        dim = write_nla_table(rows, HIDDEN / f"{name}.zarr", cfg.nla_layer, target)
        print(f"{target}: {rows.height} rows of {name}, activation_vector of layer {cfg.nla_layer} ({dim} floats)")


if __name__ == "__main__":
    main()
