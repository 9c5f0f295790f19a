"""Seeds and sweeps: a grid of params × seeds as DVC experiments, run in parallel by Prefect.

    python -m flows.sweep -S grpo.even_bonus=0,0.1,0.2 --seeds 3            # 9 experiments
    python -m flows.sweep -S grpo.even_bonus=0,0.1,0.2 --seeds 5 --targets evaluate_arithmetic \\
        --claims even_recovery,inject_vs_grpo                                # the report's Claims (results/claims.json)
    python -m flows.sweep --seeds 2 --stage-seeds grpo,inject=5 --targets evaluate_arithmetic   # 2 base/SFT x 5

Two units of variation. `--seeds N` sets the top-level `seed` to 0..N-1: every stage varies, the base model too.
`--stage-seeds grpo,inject=N` also sets `stage_seeds.grpo` and `stage_seeds.inject` (params.yaml) to 0..N-1,
together (the two stay paired), on each top-level seed: the stages upstream of them keep their params, so their
outputs (the base and SFT models of that seed) are reused and only GRPO's own variation is measured. Its rows are
per configuration and top-level seed (`seed` joins the configuration), over the stage seeds. `--claims` needs at
least MIN_SEEDS (5) seeds per arm: --seeds N, or N of --stage-seeds.

Every (configuration, seed) is one DVC experiment (`dvc exp show` lists it) named after its settings,
run in its own clone of the repository at the current commit; the clones share this repository's DVC
cache, so a stage already run with the same inputs (the same seed's `base`, say) is restored from DVC's
run cache instead of recomputed. A finished experiment is found by its name and reused, never rerun.

Where they run: with PREFECT_API_URL set and the work pool `--pool` (default latentlab) present, each
experiment is a flow run of the `latentlab-experiment/sweep` deployment, taken by whichever worker is free
(on this machine or any other with a checkout at the same path):

    prefect worker start --pool latentlab --type process --limit 1         # one experiment at a time

otherwise (or with --local) they run here, --jobs at a time. A failed experiment is retried once, then
reported as failed in the summary; the command exits 1 if any failed. Results: results/sweeps/<name>/
(sweep.md, summary.json, a figure per swept key) and a Prefect table artifact.

Clones live under .dvc/tmp/sweep/<pid>@<host>/, the process that made them. Each is removed when its experiment
ends; a sweep that ends (or fails, or is interrupted) stops what it started and removes its own directory; and a
sweep removes, when it starts and ends, the directories of processes of this host that no longer run (a sweep or
a worker's experiment killed with `kill -9`). A running sweep's clones are never touched.
"""

import argparse
import contextlib
import hashlib
import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.task_runners import ThreadPoolTaskRunner
from ruamel.yaml import YAML

from flows.claims import MIN_SEEDS
from flows.dvc import CommandError, allow_commands, param_node, run_streaming, stop_commands, stopping

FLOW = "latentlab-experiment"
DEPLOYMENT = "sweep"
RETRIES = 1  # a failed experiment is tried once more (a fresh clone), then reported as failed


@dataclass(frozen=True)
class Experiment:
    config: tuple[tuple[str, str], ...]  # the swept keys and their values (as typed: YAML text)
    seed: int  # the top-level seed: the whole pipeline's
    targets: tuple[str, ...]
    stages: tuple[str, ...] = ()  # the stages seeded on their own (stage_seeds.<stage>), downstream of fixed models
    stage_seed: int | None = None  # their seed, the same for each of them (paired), when `stages` is set

    @property
    def overrides(self) -> list[str]:
        """`dvc exp run -S` arguments."""
        own = [f"stage_seeds.{stage}={self.stage_seed}" for stage in self.stages]
        return [f"{key}={value}" for key, value in self.config] + [f"seed={self.seed}"] + own

    @property
    def name(self) -> str:
        """Readable and unique: the values, the seed (s), the stages' own seed (d) and a hash of everything that
        defines the run (without stage seeds, the same hash as before they existed: those experiments are reused)."""
        readable = "-".join(f"{key.rsplit('.', 1)[-1]}{value}" for key, value in self.config)
        defined = [self.config, self.seed, sorted(self.targets)]
        if self.stages:
            defined += [list(self.stages), self.stage_seed]
        digest = hashlib.sha256(json.dumps(defined).encode()).hexdigest()
        own = f"-d{self.stage_seed}" if self.stages else ""
        name = f"{readable}-s{self.seed}{own}-{digest[:6]}".lstrip("-")
        return re.sub(r"[^A-Za-z0-9._-]", "_", name).replace("..", "_")

    @property
    def unit(self) -> str:
        """What varies between the seeds of a row: `seed` (the whole pipeline) or `stage_seeds.grpo,inject`."""
        return f"stage_seeds.{','.join(self.stages)}" if self.stages else "seed"


def parse_grid(items: list[str]) -> dict[str, list[str]]:
    """`key=v1,v2` -> {key: [v1, v2]}; commas inside [...] belong to a list value (`label.layers=[1,-1],[2]`)."""
    grid = {}
    for item in items:
        key, sep, values = item.partition("=")
        if not sep or not values:
            raise SystemExit(f"-S expects key=value[,value...], got {item!r}")
        grid[key] = [v.strip() for v in re.findall(r"(?:\[[^\]]*\]|[^,])+", values)]
    return grid


def plan(
    grid: dict[str, list[str]],
    seeds: list[int],
    targets: list[str],
    stages: list[str] | None = None,
    stage_seeds: list[int] | None = None,
) -> list[Experiment]:
    """The grid times the seeds, configuration-major: runs side by side then have different seeds, so the
    stages a seed shares across configurations (synth, base, sft) are computed once and then restored.

    With `stages` (e.g. grpo, inject), each top-level seed is a fixed upstream (its base and SFT models), and each
    value of `stage_seeds` seeds those stages together on it: grid × stage seeds × seeds, the top-level seed varying
    fastest (runs side by side build different base models; the next ones restore them)."""
    configs: list[tuple[tuple[str, str], ...]] = [()]
    for key, values in grid.items():
        configs = [config + ((key, value),) for config in configs for value in values]
    if not stages:
        return [Experiment(config, seed, tuple(targets)) for config in configs for seed in seeds]
    if not stage_seeds:
        raise ValueError(f"stages {stages} are seeded on their own but no stage seeds are given")
    return [
        Experiment(config, seed, tuple(targets), tuple(stages), own)
        for config in configs
        for own in stage_seeds
        for seed in seeds
    ]


def parse_stage_seeds(text: str) -> tuple[list[str], list[int]]:
    """`grpo,inject=5` -> (["grpo", "inject"], [0, 1, 2, 3, 4]): the stages seeded together, and their seeds."""
    from stages.params import StageSeeds

    names, sep, count = text.partition("=")
    stages = [name.strip() for name in names.split(",") if name.strip()]
    if not sep or not stages or not count.strip().isdigit() or int(count) < 1:
        raise SystemExit(f"--stage-seeds expects STAGE[,STAGE...]=N (N >= 1), got {text!r}")
    if unknown := [stage for stage in stages if stage not in StageSeeds.model_fields]:
        raise SystemExit(
            f"--stage-seeds: {unknown} have no seed of their own (params.yaml stage_seeds has {list(StageSeeds.model_fields)})"
        )
    return stages, list(range(int(count)))


def git(repo: str | Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=repo, check=True, capture_output=True, text=True).stdout.strip()


def uncommitted(repo: str | Path) -> str:
    """Modified tracked files an experiment would silently not see (it runs a clone of the last commit).

    `results/` is left out: the sweeps write it (their summaries, the claims file) and only `report` reads
    it, so one sweep after another, before committing their results, is the normal course of work.
    """
    return git(repo, "status", "--porcelain", "--untracked-files=no", "--", ".", ":(exclude)results")


def exp_ref(baseline: str, name: str) -> str:
    """Where DVC keeps an experiment of `baseline` called `name`."""
    return f"refs/exps/{baseline[:2]}/{baseline[2:]}/{name}"


def finished(repo: str | Path, baseline: str) -> set[str]:
    """Names of the experiments of `baseline` that exist (DVC saves one only when its run succeeded)."""
    prefix = exp_ref(baseline, "")
    refs = git(repo, "for-each-ref", "--format=%(refname)", prefix).splitlines()
    return {ref.removeprefix(prefix) for ref in refs}


CLONES = Path(".dvc") / "tmp" / "sweep"  # under the repository: <pid>@<host>/<experiment>-<random>/


def clones_dir(repo: str | Path, pid: int | None = None) -> Path:
    """Where process `pid` (default: this one) of this host keeps its clones of `repo`."""
    return Path(repo) / CLONES / f"{pid or os.getpid()}@{socket.gethostname()}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive
        return True
    return True


def remove_dead_clones(repo: str | Path, log: Callable[[str], None]) -> None:
    """Remove the clones of processes of this host that no longer run (a sweep or experiment killed outright);
    those of running processes, and of other hosts sharing the directory, stay. A clone outside a <pid>@<host>
    directory (made before owners were recorded) cannot be told from a running one: it is named, not removed."""
    scratch, host = Path(repo) / CLONES, socket.gethostname()
    if not scratch.is_dir():
        return
    for entry in sorted(scratch.iterdir()):
        pid, at, owner_host = entry.name.partition("@")
        if at and pid.isdigit():
            if owner_host == host and not _alive(int(pid)):
                log(f"removing {entry.relative_to(repo)}: clones of process {pid}, which no longer runs")
                shutil.rmtree(entry, ignore_errors=True)
        else:
            log(f"{entry.relative_to(repo)}: a clone without a recorded owner; remove it once no sweep runs")


def run_one(
    repo: str, baseline: str, name: str, overrides: list[str], targets: list[str], log: Callable[[str], None]
) -> str:
    """Run one experiment in a fresh clone of `repo` at `baseline`, then hand its ref back to `repo`.

    Returns 'reused' if the experiment already exists, else 'ran'. The clone shares `repo`'s DVC cache
    (outputs and run cache), so what it computes is in `repo` the moment it is saved.
    """
    if name in finished(repo, baseline):
        return "reused"
    scratch = clones_dir(repo)
    scratch.mkdir(parents=True, exist_ok=True)
    clone = Path(tempfile.mkdtemp(prefix=f"{name}-", dir=scratch))
    try:
        git(scratch, "clone", "--quiet", "--shared", "--no-checkout", str(Path(repo).resolve()), str(clone))
        git(clone, "checkout", "--quiet", "--detach", baseline)
        cache = subprocess.run(["dvc", "cache", "dir"], cwd=repo, check=True, capture_output=True, text=True)
        run_streaming(["dvc", "config", "--local", "cache.dir", cache.stdout.strip()], clone, log)
        command = ["dvc", "exp", "run", "--name", name, *(a for o in overrides for a in ("-S", o)), *targets]
        log(f"{' '.join(command)}  (in {clone})")
        run_streaming(command, clone, log)
        ref = exp_ref(baseline, name)
        git(clone, "push", "--quiet", "origin", f"{ref}:{ref}")
        return "ran"
    finally:
        shutil.rmtree(clone, ignore_errors=True)


@flow(name=FLOW, retries=RETRIES, retry_delay_seconds=5, flow_run_name="{name}")
def run_experiment(repo: str, baseline: str, name: str, overrides: list[str], targets: list[str]) -> str:
    """One experiment of a sweep, as a work-pool worker runs it (see `run_one`), in a process of its own."""
    try:
        return run_one(repo, baseline, name, overrides, targets, get_run_logger().info)
    finally:
        with contextlib.suppress(OSError):  # this process's clones directory, empty now
            clones_dir(repo).rmdir()


def unless_stopping(task, task_run, state) -> bool:
    """Retry a failed experiment, unless the sweep is stopping (interrupted: it stopped the experiment itself)."""
    return not stopping()


@task(retries=RETRIES, retry_delay_seconds=5, retry_condition_fn=unless_stopping, task_run_name="experiment {name}")
def run_here(repo: str, baseline: str, name: str, overrides: list[str], targets: list[str]) -> str:
    return run_one(repo, baseline, name, overrides, targets, get_run_logger().info)


@task(task_run_name="experiment {name} on the pool")
def run_on_pool(repo: str, baseline: str, name: str, overrides: list[str], targets: list[str]) -> str:
    from prefect.deployments import run_deployment

    parameters = {"repo": repo, "baseline": baseline, "name": name, "overrides": overrides, "targets": targets}
    flow_run = run_deployment(f"{FLOW}/{DEPLOYMENT}", parameters=parameters, timeout=None)
    if not flow_run.state.is_completed():
        raise CommandError(f"flow run {flow_run.name} ended {flow_run.state.name}: {flow_run.state.message}")
    return "ran"


def pool_exists(pool: str) -> bool:
    """True when a Prefect server is configured (PREFECT_API_URL) and has the work pool."""
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound
    from prefect.settings import get_current_settings

    if not get_current_settings().api.url:
        return False
    with get_client(sync_client=True) as client:
        try:
            client.read_work_pool(pool)
        except ObjectNotFound:
            return False
    return True


def deploy(repo: str, pool: str) -> None:
    """(Re)create the experiment deployment on `pool`; its runs start in `repo` (the same path on every worker)."""
    source = run_experiment.from_source(source=repo, entrypoint="flows/sweep.py:run_experiment")
    source.deploy(name=DEPLOYMENT, work_pool_name=pool, build=False, push=False, print_next_steps=False)


def check_keys(repo: str, grid: dict[str, list[str]]) -> None:
    """Every swept key must exist in params.yaml, so a typo fails here, naming it, before any run."""
    from ruamel.yaml import YAML

    params = YAML(typ="safe").load((Path(repo) / "params.yaml").read_text())
    for key in grid:
        if key == "seed":
            raise SystemExit("sweep seeds with --seeds, not -S seed=...")
        if key.split(".")[0] == "stage_seeds":
            raise SystemExit(f"sweep a stage's own seed with --stage-seeds, not -S {key}=...")
        param_node(params, key, "params.yaml")


def push(repo: str, names: list[str], log: Callable[[str], None]) -> None:
    """`dvc exp push` to every git remote: the experiments' commits, and their outputs to the default DVC
    remote when one is set (DVC keeps experiments as git refs, so pushing them needs a git remote)."""
    remotes = git(repo, "remote").split()
    if not remotes:
        log("no git remote: the experiments stay in this repository (add one to push them)")
    has_dvc_remote = bool(subprocess.run(["dvc", "remote", "default"], cwd=repo, capture_output=True).stdout.strip())
    for remote in remotes:
        run_streaming(["dvc", "exp", "push", *([] if has_dvc_remote else ["--no-cache"]), remote, *names], repo, log)


@flow(name="latentlab-sweep", log_prints=True)
def sweep(
    repo: str = ".",
    grid: dict[str, list[str]] | None = None,
    seeds: list[int] | None = None,
    targets: list[str] | None = None,
    pool: str | None = None,
    name: str | None = None,
    claims: list[str] | None = None,
    push_at_end: bool = False,
    command: str = "",
    stages: list[str] | None = None,
    stage_seeds: list[int] | None = None,
) -> dict:
    """Run (or reuse) every experiment of the grid × seeds, then summarize them; returns the summary.

    pool: the Prefect work pool whose workers run the experiments (None: here, on the flow's task runner).
    stages, stage_seeds: seed these stages on their own with each of `stage_seeds`, on each top-level seed (`plan`).
    """
    from flows.claims import update_claims
    from flows.sweep_results import publish, summarize_sweep

    repo, grid, seeds, targets = str(Path(repo).resolve()), grid or {}, seeds or [0], targets or []
    check_keys(repo, grid)
    per_arm = len(stage_seeds or []) if stages else len(seeds)
    if claims and per_arm < MIN_SEEDS:
        raise SystemExit(
            f"--claims needs at least {MIN_SEEDS} seeds per arm, this sweep has {per_arm} "
            f"({'--stage-seeds' if stages else '--seeds'}): fewer decide nothing"
        )
    if dirty := uncommitted(repo):
        raise SystemExit(f"commit first: the experiments run the last commit, and these files differ:\n{dirty}")
    allow_commands()
    remove_dead_clones(repo, print)
    baseline = git(repo, "rev-parse", "HEAD")
    experiments = plan(grid, seeds, targets, stages, stage_seeds)
    done = finished(repo, baseline)
    todo = [e for e in experiments if e.name not in done]
    print(f"{len(experiments)} experiments of {baseline[:7]}: {len(experiments) - len(todo)} found, {len(todo)} to run")
    if pool and todo:
        deploy(repo, pool)
    runner = run_on_pool if pool else run_here
    started = time.perf_counter()
    status = {}
    try:
        futures = {e.name: runner.submit(repo, baseline, e.name, e.overrides, list(targets)) for e in todo}
        for e in experiments:
            if e.name in futures:
                futures[e.name].wait()
                state = futures[e.name].state
                failed = {"status": "failed", "error": state.message}
                status[e.name] = {"status": "ran"} if state.is_completed() else failed
            else:
                status[e.name] = {"status": "reused"}
    finally:  # also when interrupted: what runs here stops, and no clone of this process stays behind
        if len(status) < len(experiments):
            stop_commands()
        shutil.rmtree(clones_dir(repo), ignore_errors=True)
        remove_dead_clones(repo, print)
    wall = time.perf_counter() - started
    summary = summarize_sweep(repo, baseline, experiments, status, command, wall)
    publish(repo, name or "-".join(grid) or "seeds", summary)
    if claims:
        model = YAML(typ="safe").load((Path(repo) / "params.yaml").read_text()).get("model", {})
        update_claims(Path(repo) / "results" / "claims.json", claims, summary, model)
    if push_at_end:
        ok = [e.name for e in experiments if status[e.name]["status"] != "failed"]
        push(repo, ok, get_run_logger().info)
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repo", default=".")
    parser.add_argument("--set", "-S", action="append", default=[], metavar="KEY=V1,V2", help="a swept param")
    parser.add_argument(
        "--seeds",
        type=int,
        default=MIN_SEEDS,
        help="top-level seeds 0..N-1 per configuration: the whole pipeline varies",
    )
    parser.add_argument(
        "--stage-seeds",
        metavar="STAGE[,STAGE]=N",
        help="seed these stages on their own (stage_seeds.<stage>, together: paired) with 0..N-1 on each top-level "
        "seed, whose upstream models are then fixed: e.g. grpo,inject=5 (rows: per configuration and top-level seed)",
    )
    parser.add_argument("--targets", nargs="*", default=[], help="stages to run (default: the whole DAG)")
    parser.add_argument("--pool", default="latentlab", help="Prefect work pool (used when the server has it)")
    parser.add_argument("--local", action="store_true", help="run here even if the work pool exists")
    parser.add_argument("--jobs", "-j", type=int, default=2, help="experiments at a time when running here")
    parser.add_argument("--name", help="results/sweeps/<name> (default: the swept keys)")
    parser.add_argument("--claims", help="comma-separated claim ids to (re)write in results/claims.json")
    parser.add_argument("--push", dest="push_at_end", action="store_true", help="dvc exp push at the end")
    args = parser.parse_args()
    on_pool = not args.local and pool_exists(args.pool)
    workers = 64 if on_pool else args.jobs  # on the pool, the workers set the pace; a thread waits on each run
    print(f"running on work pool {args.pool!r}" if on_pool else f"running here, {args.jobs} at a time")
    stages, stage_seeds = parse_stage_seeds(args.stage_seeds) if args.stage_seeds else (None, None)
    summary = sweep.with_options(task_runner=ThreadPoolTaskRunner(max_workers=workers))(
        repo=args.repo,
        grid=parse_grid(args.set),
        seeds=list(range(args.seeds)),
        targets=args.targets,
        pool=args.pool if on_pool else None,
        name=args.name,
        claims=args.claims.split(",") if args.claims else None,
        push_at_end=args.push_at_end,
        command=shlex.join(["python", "-m", "flows.sweep", *sys.argv[1:]]),
        stages=stages,
        stage_seeds=stage_seeds,
    )
    raise SystemExit(1 if summary["counts"]["failed"] else 0)


if __name__ == "__main__":
    main()
