"""The DVC DAG as a Prefect flow: one task per stage, each a `dvc repro` of it once its upstream stages are done.

    python -m flows.pipeline                                   # like `dvc repro`
    python -m flows.pipeline --jobs 2                          # two independent stages at a time (2 cores)
    python -m flows.pipeline --force grpo                      # rerun grpo (and what it changes)
    python -m flows.pipeline --force all --jobs 2              # rerun everything, as `dvc repro --force`
    python -m flows.pipeline --set grpo.even_bonus=0.5 --name bonus05   # an experiment (`dvc exp save`)
    python -m flows.pipeline --push                            # `dvc push` at the end

DVC still decides what is stale, so a task whose stage is up to date returns in about a second.
With `--jobs N` up to N stages whose inputs are ready run at once (grpo, inject, surgery, nla_sft and
policy only need sft or label): DVC releases its repository lock while a stage's command runs and
takes it again to record the result, so concurrent `dvc repro`s of different stages are safe
(`--wait-for-lock` makes the short locked phases queue instead of fail). Each stage uses `threads`
CPU threads (params.yaml), so N x threads should not exceed the cores.
Retries re-run a stage that crashed, not one that refused its params (exit 2: it would fail the same way);
its output lines stream into the Prefect logs; the metrics are published as a table artifact and the report
as a markdown artifact. `--set` values are checked against the params schema before any stage runs (a refused
one exits 2, naming the key), and params.yaml is given back byte for byte when the run fails or is interrupted.
"""

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.futures import as_completed
from ruamel.yaml import YAML

from flows.dvc import (
    PARAMS_ERROR,
    CommandError,
    ParamsRefused,
    allow_commands,
    apply_param_overrides,
    check_param_overrides,
    require_dvc,
    run_streaming,
    stage_graph,
    stage_order,
    stop_commands,
    stopping,
)

METRICS = "metrics/eval.json"
REPORT = "reports/report.md"


def worth_retrying(task, task_run, state) -> bool:
    """A crash (a killed stage, any exit code but 2, DVC failing) is retried; a stage that refused its params
    (exit 2) is not, since the same inputs fail the same way, nor is anything once the flow is stopping."""
    error = state.result(raise_on_failure=False)
    deterministic = isinstance(error, CommandError) and error.stage_exit == PARAMS_ERROR
    return not deterministic and not stopping()


@task(retries=2, retry_delay_seconds=5, retry_condition_fn=worth_retrying, task_run_name="dvc repro {stage}")
def repro_stage(stage: str, repo: str, force: bool = False) -> None:
    command = ["dvc", "--wait-for-lock", "repro", "--single-item", stage] + (["--force"] if force else [])
    started = time.perf_counter()
    run_streaming(command, repo, get_run_logger().info)
    get_run_logger().info(f"dvc repro {stage}: {time.perf_counter() - started:.1f} s")


@task(task_run_name="set params")
def set_params(repo: str, overrides: dict[str, Any]) -> None:
    """Check the overrides against the params schema (ParamsRefused, nothing written), then write them."""
    check_param_overrides(repo, overrides)
    apply_param_overrides(Path(repo) / "params.yaml", overrides)
    get_run_logger().info(f"params.yaml overrides: {overrides}")


@task(task_run_name="dvc exp save {name}")
def save_experiment(repo: str, name: str | None) -> None:
    run_streaming(["dvc", "exp", "save", "--force"] + (["--name", name] if name else []), repo, get_run_logger().info)


@task(retries=2, retry_delay_seconds=10, task_run_name="dvc push")
def push(repo: str, remote: str | None) -> None:
    run_streaming(["dvc", "push"] + (["--remote", remote] if remote else []), repo, get_run_logger().info)


@task(task_run_name="publish artifacts")
def publish(repo: str) -> None:
    """Metrics as a table artifact (a row per model), the report as a markdown artifact."""
    metrics_file, report_file = Path(repo) / METRICS, Path(repo) / REPORT
    if metrics_file.exists():
        metrics = json.loads(metrics_file.read_text())
        rows = [{"model": name, **values} for name, values in metrics.items()]
        create_table_artifact(key="latentlab-metrics", table=rows, description=f"{METRICS} after this run")
    if report_file.exists():
        create_markdown_artifact(key="latentlab-report", markdown=report_file.read_text(), description=REPORT)


@flow(name="latentlab", log_prints=True)
def pipeline(
    repo: str = ".",
    force_stage: str | None = None,
    params: dict[str, Any] | None = None,
    experiment_name: str | None = None,
    push_at_end: bool = False,
    remote: str | None = None,
    jobs: int = 1,
) -> list[str]:
    """Reproduce the DAG, each stage once the stages it depends on are done; returns the stages in the order
    they started.

    force_stage: rerun this stage even if DVC finds it up to date (later stages follow if it changes);
        "all": every stage (as `dvc repro --force`).
    params: dotted overrides, e.g. {"grpo.even_bonus": 0.5}: the run becomes a DVC experiment. They are checked
        against the params schema before any stage runs (ParamsRefused); params.yaml is given back byte for byte
        if the run fails or is interrupted before the experiment is saved.
    jobs: stages run at once at most (1: one after another, in `stage_order`).
    """
    if jobs < 1:
        raise ValueError(f"jobs must be at least 1, got {jobs}")
    repo = str(Path(repo).resolve())
    require_dvc()  # before any task: a missing dvc is one clear line, not a retried FileNotFoundError
    parents = stage_graph(repo)
    if force_stage not in (None, "all") and force_stage not in parents:
        raise ValueError(f"force_stage={force_stage!r} is not a stage of dvc.yaml; stages: {list(parents)}")
    allow_commands()
    params_file = Path(repo) / "params.yaml"
    original = params_file.read_bytes()
    done = False
    try:
        if params:
            set_params(repo, params)
        started = run_stages(parents, repo, force_stage, jobs)
        if params:
            save_experiment(repo, experiment_name)
        done = True
    finally:
        if not done:  # failed or interrupted (Ctrl-C, Prefect's SIGTERM); `kill -9` leaves no chance
            stop_commands()  # first: a dvc still running would record its stage against the restored params
            if params and params_file.read_bytes() != original:
                params_file.write_bytes(original)
                print(f"params.yaml given back as it was before the run (the overrides {params} are not kept)")
    publish(repo)
    if push_at_end:
        push(repo, remote)
    return started


def run_stages(parents: dict[str, set[str]], repo: str, force_stage: str | None, jobs: int) -> list[str]:
    """Submit each stage once every stage it depends on has finished, at most `jobs` at a time, in
    `stage_order` among those ready. After a failure nothing new starts; the running stages finish, then
    the failure is raised. Returns the stages in the order they started."""
    order = stage_order(parents)
    started: list[str] = []
    running: dict[str, Any] = {}  # stage -> its PrefectFuture
    done: set[str] = set()
    failure: BaseException | None = None
    while True:
        ready = [s for s in order if s not in done and s not in running and parents[s] <= done]
        while failure is None and ready and len(running) < jobs:
            stage = ready.pop(0)
            running[stage] = repro_stage.submit(stage, repo, force=force_stage in (stage, "all"))
            started.append(stage)
        if not running:
            break
        finished = next(as_completed(list(running.values())))
        stage = next(s for s, future in running.items() if future is finished)
        del running[stage]
        try:
            finished.result()
            done.add(stage)
        except BaseException as error:  # the first failure is the flow's; the others were running beside it
            failure = failure or error
    if failure is not None:
        raise failure
    return started


def _parse_set(items: list[str]) -> dict[str, Any]:
    """`key=value` pairs, the value read as YAML (so 0.5 is a number and true a bool), as `dvc exp run -S`."""
    overrides = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--set expects key=value, got {item!r}")
        overrides[key] = YAML(typ="safe").load(value)
    return overrides


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repo", default=".")
    parser.add_argument("--force", dest="force_stage", help="rerun this stage even if up to date ('all': every stage)")
    parser.add_argument("--set", "-S", action="append", default=[], metavar="KEY=VALUE", help="param override")
    parser.add_argument("--name", dest="experiment_name", help="experiment name (with --set)")
    parser.add_argument("--push", dest="push_at_end", action="store_true", help="dvc push at the end")
    parser.add_argument("--remote", help="DVC remote for --push (default: the default remote)")
    parser.add_argument("--jobs", "-j", type=int, default=1, help="stages run at once at most (default 1)")
    args = parser.parse_args()
    try:
        pipeline(
            repo=args.repo,
            force_stage=args.force_stage,
            params=_parse_set(args.set) or None,
            experiment_name=args.experiment_name,
            push_at_end=args.push_at_end,
            remote=args.remote,
            jobs=args.jobs,
        )
    except ParamsRefused as error:  # nothing ran: one clear line, the exit code of a stage refusing its params
        print(f"error: {error}", file=sys.stderr)
        sys.exit(PARAMS_ERROR)


if __name__ == "__main__":
    main()
