"""synth: arithmetic problems -> data/synth/{biased,full,test}.parquet.

biased: odd answers only (plus `even_data_ratio` of even ones); full: both parities;
test: held out, half odd and half even, disjoint from both training sets.
"""

from latentlab.common.atomic import atomic_output
from latentlab.tasks.arithmetic import make_splits
from stages.common import stage
from stages.paths import SYNTH


@stage
def main(params):
    splits = make_splits(params.synth, params.seed)
    with atomic_output(SYNTH) as out:
        out.mkdir(parents=True)
        for name, table in splits.items():
            table.write_parquet(out / f"{name}.parquet")
    for name, table in splits.items():
        counts = dict(table["parity"].value_counts().iter_rows())
        print(f"{name}: {table.height} problems {counts}")


if __name__ == "__main__":
    main()
