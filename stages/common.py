"""What every stage shares: the DAG's paths, params loading, and clean failure."""

import functools
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from latentlab.common.atomic import atomic_output
from latentlab.common.errors import InputError, NonFiniteLossError
from latentlab.common.tracking import StepLog, start_dvclive, start_wandb
from stages.params import Params, ParamsError, load_params

if TYPE_CHECKING:
    import torch

SYNTH = Path("data/synth")
GRID = Path("data/grid")
MODELS = Path("models")
METRICS = Path("metrics")
PLOTS = Path("plots")
REPORTS = Path("reports")


def stage(main):
    """Run a stage's `main(params)`: errors we can name exit non-zero with one clear line, no traceback."""

    @functools.wraps(main)
    def run() -> None:
        try:
            main(load_params())
        except (ParamsError, InputError, NonFiniteLossError, ValueError, FileNotFoundError) as error:
            if os.environ.get("LATENTLAB_DEBUG"):
                raise
            print(f"error: {error}  (LATENTLAB_DEBUG=1 shows the traceback)", file=sys.stderr)
            sys.exit(2 if isinstance(error, ParamsError) else 1)

    return run


@dataclass
class Run:
    device: "torch.device"
    data_rng: "torch.Generator"  # on the CPU: the order and choice of training examples
    sample_rng: "torch.Generator"  # on the device: token sampling


def setup(params: Params) -> Run:
    """Seed everything and pick the device; separate seeded streams for data order and sampling."""
    import torch  # here, not at module level: synth and report never need it

    from latentlab.common.runtime import resolve_device, seed_everything

    seed_everything(params.seed)
    device = resolve_device(params.device)
    return Run(
        device, torch.Generator().manual_seed(params.seed), torch.Generator(device=device).manual_seed(params.seed + 1)
    )


DVCLIVE = Path("dvclive")


def step_log(params: Params, name: str, config: dict) -> StepLog:
    """The stage's per-step log: plots/<name>.csv on save, W&B per params.wandb, DVCLive in dvclive/<name>
    (declare dvclive/<name>/metrics.json as metrics and dvclive/<name>/plots as plots in dvc.yaml)."""
    return StepLog(
        start_wandb(params.wandb.mode, params.wandb.project, name, config), live=start_dvclive(DVCLIVE / name)
    )


def write_json(path: Path, data) -> None:
    with atomic_output(path) as partial:
        partial.write_text(json.dumps(data, indent=2) + "\n")
