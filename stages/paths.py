"""Every path of the DAG, in one place: what dvc.yaml declares as deps and outs, named once.

Stages, flows and the report import these instead of spelling a path; `MODELS / "sft"` style joins name a
stage's own output under its root. The paths are relative to the project root, where DVC runs every stage.
"""

from pathlib import Path

DATA = Path("data")
SYNTH = DATA / "synth"  # synth: the problem sets, <set>.parquet
GRID = DATA / "grid"  # grid: transitions.zarr and the observation texts
GRID_TRANSITIONS = GRID / "transitions.zarr"
GRID_TEXTS = GRID / "texts.parquet"
HIDDEN = DATA / "hidden"  # label: one hidden-state store per set, <set>.zarr
LABELS = DATA / "labels"  # label: one row table per set, <set>.parquet
LABEL_WORK = DATA / ".partial" / "label"  # label's resumable work, outside the DVC outputs
NLA = DATA / "nla"  # nla_table: the NLA tables (label's outputs are whole directories: these live apart)
NLA_TABLE = NLA / "nla.parquet"  # (prompt, response, activation_vector) for training
NLA_EVAL_TABLE = NLA / "nla_eval.parquet"  # the held-out vectors
GRID_STORE = HIDDEN / "grid.zarr"  # label: the grid texts' hidden states
PREDICTIONS = DATA / "eval" / "predictions.parquet"  # evaluate_arithmetic: every completion

MODELS = Path("models")  # one save_pretrained directory per training stage, models/<stage>
SOURCE = MODELS / "source.json"  # source: what models/base is made from
METRICS = Path("metrics")
PLOTS = Path("plots")
REPORTS = Path("reports")
DVCLIVE = Path("dvclive")
CLAIMS = Path("results/claims.json")  # committed; written by `python -m flows.sweep --claims ...`


def store(name: str) -> Path:
    """The hidden-state store of labelled set `name`."""
    return HIDDEN / f"{name}.zarr"


def labels(name: str) -> Path:
    """The row table beside store(name): the set's rows plus the generated text."""
    return LABELS / f"{name}.parquet"
