"""label: hidden states of the base LM over the problems -> data/hidden/<set>.zarr, data/labels/.

Per set in `label.datasets` (problem sets from data/synth; `grid`: the grid world's observation
texts from data/grid/texts.parquet): a Zarr store with `pooled (N, L, H)` (and `tokens (N, T, L, H)` with
`label.store_tokens`), and data/labels/<set>.parquet: the problems plus the generated text. The NLA tables
are built from these by the `nla_table` stage.

A killed run resumes from its last complete shard: work in progress lives in data/.partial/label,
outside the DVC outputs, and only complete stores are moved into data/hidden.
`torchrun --nproc_per_node N -m stages.label` (or `launcher.nproc: N`) splits the shards across N processes.
"""

import polars as pl

from latentlab.common.distributed import distributed
from latentlab.common.inputs import read_table, require_model_dir
from latentlab.hidden.labelling import LabelSet, label_sets
from latentlab.tasks.arithmetic import PROBLEM_SCHEMA
from stages.common import check_layers, setup, stage
from stages.paths import GRID_TEXTS, LABEL_WORK, MODELS, SYNTH, labels, store


def rows(name: str) -> pl.DataFrame:
    """The rows of a set: the problems, or the grid texts (id, prompt, episode, step)."""
    if name == "grid":
        return read_table(GRID_TEXTS, {"id": pl.Int64, "prompt": pl.String})
    return read_table(SYNTH / f"{name}.parquet", PROBLEM_SCHEMA)


@stage(torchrun=True)
def main(params):
    cfg = params.label
    with distributed() as ranks:
        run = setup(params)
        base = require_model_dir(MODELS / "base")
        check_layers(params, base, ("label.layers",))
        # the same run as `latentlab label`: every set is checked (empty, too long) before any is labelled
        sets = [LabelSet(name, rows(name), store(name), labels(name), LABEL_WORK / name) for name in cfg.datasets]
        label_sets(base, sets, cfg, params.seed, run.device, ranks, params.prompt)


if __name__ == "__main__":
    main()
