"""nla_table: labelled sets -> the NLA tables data/nla/nla.parquet and data/nla/nla_eval.parquet.

The reference NLA format (id, prompt, response, activation_vector), one row per labelled problem: the vector is
layer `nla_table.layer` of the set's store (data/hidden/<set>.zarr), the response the text it was pooled over.
Each table carries its own facts in its Arrow schema metadata (the layer, the store, its model, pooling; see
latentlab/hidden/nla_table.py), which nla_sft, nla_rl and evaluate_nla read instead of this stage's params.
Its own stage, apart from `label`: choosing another layer or set rebuilds the tables, not the stores.
"""

import polars as pl

from latentlab.hidden.nla_table import write_nla_table
from stages.common import stage
from stages.paths import NLA_EVAL_TABLE, NLA_TABLE, labels, store


@stage
def main(params):
    cfg = params.nla_table
    for name, target in ((cfg.dataset, NLA_TABLE), (cfg.eval_dataset, NLA_EVAL_TABLE)):
        if name is None:
            continue
        rows = pl.read_parquet(labels(name))
        dim = write_nla_table(rows, store(name), cfg.layer, target)
        print(f"{target}: {rows.height} rows of {name}, activation_vector of layer {cfg.layer} ({dim} floats)")


if __name__ == "__main__":
    main()
