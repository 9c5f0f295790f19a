"""What every stage shares: params loading, seeding and the device, checked outputs, and clean failure."""

import functools
import json
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from latentlab.common.atomic import atomic_output
from latentlab.common.errors import UnwritableOutputError, describe_failure, os_problem
from latentlab.common.tracking import StepLog, start_dvclive, start_wandb
from stages.params import Params, ParamsError, load_params
from stages.paths import DVCLIVE, MODELS

if TYPE_CHECKING:
    import torch

    from latentlab.common.distributed import Ranks, Shards


def stage(main=None, *, torchrun: bool = False):
    """Run a stage's `main(params)` inside the one error boundary of every stage: any failure exits non-zero with
    one line that names the file, key or device and what to do (`failure`), the traceback only under
    LATENTLAB_DEBUG=1. Exit 2 for a params error (rerunning will not fix it), 1 for anything else.

    `main` gets the params with the stage's own seed as `params.seed`: `stage_seeds.<stage>` when set, else the
    top-level `seed` (`Params.for_stage`), so `setup` and every draw of the stage follow it.

    Before `main`, the outputs the stage declares in dvc.yaml are checked writable, with room for the models it
    writes (`check_outputs`): a read-only or full disk stops it before it trains, not after.

    `@stage(torchrun=True)`: the stage trains under torchrun. With `launcher.nproc * launcher.nnodes > 1` and
    no torchrun around it yet, `python -m stages.<name>` re-executes itself under torchrun (`launch`), so
    dvc.yaml's commands stay as they are; under torchrun the process group is started around `main`, and
    a failing worker's one line (or, under LATENTLAB_DEBUG=1, `record`'s traceback) reaches torchrun, which
    takes the whole job down.
    """
    if main is None:
        return functools.partial(stage, torchrun=torchrun)

    @functools.wraps(main)
    def run() -> None:
        try:
            module = main.__module__
            if module == "__main__":  # python -m stages.x: the module's real name
                module = getattr(sys.modules["__main__"].__spec__, "name", module)
            params = load_params().for_stage(module.rpartition(".")[2])  # its seed: stage_seeds.<stage> or seed
            if os.environ.get("RANK", "0") == "0":  # rank 0 writes the outputs
                check_outputs(module)
            if torchrun:
                launch(params.launcher, main.__module__)
                from latentlab.common.distributed import distributed

                with distributed():
                    main(params)
            else:
                main(params)
        except Exception as error:
            if os.environ.get("LATENTLAB_DEBUG"):
                raise
            code, line = failure(error)
            rank = f"rank {os.environ['RANK']}: " if "RANK" in os.environ else ""
            print(f"{rank}error: {line}  (LATENTLAB_DEBUG=1 shows the traceback)", file=sys.stderr)
            sys.exit(code)

    if not torchrun:
        return run
    from torch.distributed.elastic.multiprocessing.errors import record

    return record(run)


def failure(error: Exception) -> tuple[int, str]:
    """(exit code, one line) of a stage's failure: 2 for a params error, the library's rules for the rest."""
    return describe_failure(error, usage_errors=(ParamsError,))


def check_writable(*paths: str | Path, need_bytes: int = 0) -> None:
    """Fail now, before any work, if an output cannot be written: for each path, write a 4 KiB probe file (synced,
    then removed) in the directory the output will be created in: its parent, or the nearest ancestor that exists
    (nothing is left behind); with `need_bytes`, that directory's disk must have that much free (a rough
    estimate of what the stage will write). Raises UnwritableOutputError naming the path, the directory and what
    to do."""
    for path in map(Path, paths):
        where = path.parent
        while not where.exists() and where != where.parent:
            where = where.parent
        if not where.is_dir():
            raise UnwritableOutputError(f"{path} cannot be written: {where} is a file, not a directory: move it away")
        try:
            handle, probe = tempfile.mkstemp(prefix=".write-check-", dir=where)
            try:
                os.write(handle, bytes(4096))
                os.fsync(handle)
            finally:
                os.close(handle)
                os.unlink(probe)
        except OSError as error:
            raise UnwritableOutputError(f"{path} cannot be written: {os_problem(error, where)}") from None
        if need_bytes and (free := shutil.disk_usage(where).free) < need_bytes:
            raise UnwritableOutputError(
                f"{path} needs about {_size(need_bytes)}, but the disk of {where} has {_size(free)} free: "
                "free some space and rerun"
            )


def _size(count: int) -> str:
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6)):
        if count >= scale:
            return f"{count / scale:.1f} {unit}"
    return f"{count / 1e3:.0f} kB"


def declared(module: str, dvc_yaml: str | Path = "dvc.yaml") -> tuple[list[Path], list[Path]]:
    """(outputs, dependencies) that dvc.yaml declares for the stage whose command runs `python -m <module>`
    (outs, metrics and plots are all outputs); nothing outside a DVC project or for a module no stage runs."""
    from ruamel.yaml import YAML, YAMLError

    try:
        stages = (YAML(typ="safe").load(Path(dvc_yaml).read_text()) or {}).get("stages") or {}
    except (OSError, YAMLError, AttributeError):
        return [], []
    for spec in stages.values():
        command = spec.get("cmd", "") if isinstance(spec, dict) else ""
        words = " ".join(command if isinstance(command, list) else [command]).split()
        if any(a == "-m" and b == module for a, b in zip(words, words[1:], strict=False)):
            outputs = [Path(name) for key in ("outs", "metrics", "plots") for name in _names(spec, key)]
            return outputs, [Path(name) for name in _names(spec, "deps")]
    return [], []


def _names(spec: dict, key: str) -> list[str]:
    """The paths of a dvc.yaml list: plain strings, or one-key mappings `path: {options}`."""
    return [next(iter(entry)) if isinstance(entry, dict) else entry for entry in spec.get(key) or []]


def check_outputs(module: str) -> None:
    """`check_writable` for the outputs dvc.yaml declares for this stage; a model output needs about as much
    room as the models the stage reads (a fine-tuned copy is as large as its parent)."""
    outputs, deps = declared(module)
    parents = {}
    for output in outputs:  # one probe per directory
        parents.setdefault(output.parent, output)
    check_writable(*parents.values())
    if written := [output for output in outputs if output.parts[:1] == (MODELS.name,)]:
        read = [path for path in deps if path.parts[:1] == (MODELS.name,) and path.exists()]
        if need := sum(file.stat().st_size for path in read for file in path.rglob("*") if file.is_file()):
            check_writable(*written, need_bytes=need)


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

    `params.seed` is the stage's effective seed: `stage` hands its `main` the params of `Params.for_stage`, whose
    seed is `stage_seeds.<stage>` when that is set.

    Under torchrun every rank seeds alike (same data order, same initial weights); sampling streams are
    per shard (latentlab/common/distributed.py), shard 0's being the single-process run's.
    """
    import torch  # here, not at module level: synth and report never need it

    from latentlab.common.distributed import Shards, current_ranks
    from latentlab.common.numerics import configure_torch
    from latentlab.common.runtime import resolve_device, seed_everything, set_precision

    seed_everything(params.seed, params.threads)
    ranks = current_ranks()
    try:
        device = resolve_device(params.device)
    except ValueError as error:
        raise ParamsError(f"params.yaml: device: {error}") from None
    if device.type == "cuda" and device.index is None:  # torchrun: the GPU `distributed()` made current
        device = torch.device("cuda", torch.cuda.current_device())
    configure_torch(device)  # portable numerics on a GPU: deterministic algorithms where torch has them
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


def check_layers(params: Params, model_dir: Path, keys: tuple[str, ...]) -> None:
    """The layer indices under `keys` (the ones this stage uses) against the saved model's layer count, before
    any work: a hub model's count is known only once it is saved (a scratch model's is `model.layers`, checked
    with the params)."""
    from transformers import AutoConfig

    if problem := params.layer_problem(AutoConfig.from_pretrained(model_dir).num_hidden_layers, keys):
        raise ParamsError(f"params.yaml: {problem}")


def require_divisible(run: Run, value: int, key: str) -> None:
    """A global batch size `key` must split into the run's shards (a GRPO group stays on one rank)."""
    if value % run.shards.count:
        raise ParamsError(
            f"params.yaml: {key} ({value}) is not divisible by the {run.shards.count} shards of the batch "
            "(launcher.shards, or the number of processes when it is 0)"
        )


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
