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

    from latentlab.common.distributed import Ranks, Shards

SYNTH = Path("data/synth")
GRID = Path("data/grid")
MODELS = Path("models")
METRICS = Path("metrics")
PLOTS = Path("plots")
REPORTS = Path("reports")


def stage(main=None, *, torchrun: bool = False):
    """Run a stage's `main(params)`: errors we can name exit non-zero with one clear line, no traceback.

    `@stage(torchrun=True)`: the stage trains under torchrun. With `launcher.nproc * launcher.nnodes > 1` and
    no torchrun around it yet, `python -m stages.<name>` re-executes itself under torchrun (`launch`), so
    dvc.yaml's commands stay as they are; under torchrun the process group is started around `main`, and
    `record` hands a failing worker's traceback to torchrun, which takes the whole job down.
    """
    if main is None:
        return functools.partial(stage, torchrun=torchrun)

    @functools.wraps(main)
    def run() -> None:
        try:
            params = load_params()
            if torchrun:
                launch(params.launcher, main.__module__)
                from latentlab.common.distributed import distributed

                with distributed():
                    main(params)
            else:
                main(params)
        except (ParamsError, InputError, NonFiniteLossError, ValueError, FileNotFoundError) as error:
            if os.environ.get("LATENTLAB_DEBUG"):
                raise
            rank = f"rank {os.environ['RANK']}: " if "RANK" in os.environ else ""
            print(f"{rank}error: {error}  (LATENTLAB_DEBUG=1 shows the traceback)", file=sys.stderr)
            sys.exit(2 if isinstance(error, ParamsError) else 1)

    if not torchrun:
        return run
    from torch.distributed.elastic.multiprocessing.errors import record

    return record(run)


def launch(launcher, module: str) -> None:
    """Re-execute this stage as `torchrun ... -m <module>` when `launcher` asks for more than one process and
    no torchrun started this one (WORLD_SIZE unset); otherwise return and run here."""
    if launcher.nproc * launcher.nnodes == 1 or "WORLD_SIZE" in os.environ:
        return
    if module == "__main__":  # python -m stages.x: the module's real name
        module = sys.modules["__main__"].__spec__.name
    rendezvous = (
        ["--standalone"]
        if launcher.nnodes == 1
        else [f"--nnodes={launcher.nnodes}", "--rdzv-backend=c10d", f"--rdzv-endpoint={launcher.rdzv_endpoint}"]
    )
    command = [sys.executable, "-m", "torch.distributed.run", *rendezvous, f"--nproc-per-node={launcher.nproc}"]
    print("launching:", " ".join([*command[1:], "-m", module]), file=sys.stderr, flush=True)
    os.execv(sys.executable, [*command, "-m", module])


@dataclass
class Run:
    device: "torch.device"
    data_rng: "torch.Generator"  # on the CPU: the order and choice of training examples (the same on every rank)
    sample_rng: "torch.Generator"  # on the device: token sampling (shard 0's stream: the run's own)
    ranks: "Ranks" = None  # this process under torchrun (rank 0 of 1 without it)
    shards: "Shards" = None  # how sampling stages cut the global batch (launcher.shards)
    sample_rngs: "list[torch.Generator]" = None  # one sampling stream per local shard; [sample_rng] for one

    @property
    def leader(self) -> bool:
        """Rank 0: the process that writes outputs and logs."""
        return self.ranks.rank == 0


def setup(params: Params) -> Run:
    """Seed everything and pick the device; separate seeded streams for data order and sampling.

    Under torchrun every rank seeds alike (same data order, same initial weights); sampling streams are
    per shard (latentlab/common/distributed.py), shard 0's being the single-process run's.
    """
    import torch  # here, not at module level: synth and report never need it

    from latentlab.common.distributed import Shards, current_ranks
    from latentlab.common.runtime import resolve_device, seed_everything, set_precision

    seed_everything(params.seed, params.threads)
    ranks = current_ranks()
    device = resolve_device(params.device)
    if device.type == "cuda" and device.index is None:  # torchrun: the GPU `distributed()` made current
        device = torch.device("cuda", torch.cuda.current_device())
    try:
        set_precision(params.gpu.precision, device)
    except ValueError as error:
        raise ParamsError(f"params.yaml: {error}") from None
    try:
        shards = Shards.of(params.launcher.shards, ranks)
    except ValueError as error:
        raise ParamsError(f"params.yaml: launcher.shards: {error}") from None
    sample_rngs = shards.generators(params.seed + 1, device)
    return Run(device, torch.Generator().manual_seed(params.seed), sample_rngs[0], ranks, shards, sample_rngs)


def require_divisible(run: Run, value: int, key: str) -> None:
    """A global batch size `key` must split into the run's shards (a GRPO group stays on one rank)."""
    if value % run.shards.count:
        raise ParamsError(
            f"params.yaml: {key} ({value}) is not divisible by the {run.shards.count} shards of the batch "
            "(launcher.shards, or the number of processes when it is 0)"
        )


def lm_shards(run: Run) -> "Shards":
    """Supervised training's shards: one per process (no sampling streams: one process is the reference)."""
    from latentlab.common.distributed import Shards

    return Shards(run.ranks.world, run.ranks)


DVCLIVE = Path("dvclive")


def step_log(params: Params, name: str, config: dict) -> StepLog:
    """The stage's per-step log: plots/<name>.csv on save, W&B per params.wandb, DVCLive in dvclive/<name>
    (declare dvclive/<name>/metrics.json as metrics and dvclive/<name>/plots as plots in dvc.yaml)."""
    if os.environ.get("RANK", "0") != "0":  # under torchrun rank 0 alone logs (the others' rows are never saved)
        return StepLog()
    return StepLog(
        start_wandb(params.wandb.mode, params.wandb.project, name, config), live=start_dvclive(DVCLIVE / name)
    )


def write_json(path: Path, data) -> None:
    with atomic_output(path) as partial:
        partial.write_text(json.dumps(data, indent=2) + "\n")
