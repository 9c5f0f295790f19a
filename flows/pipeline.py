"""The DVC DAG as a Prefect flow: one task per stage, in DVC's order, each a `dvc repro` of it.

    python -m flows.pipeline                                   # like `dvc repro`
    python -m flows.pipeline --force grpo                      # rerun grpo (and what it changes)
    python -m flows.pipeline --set grpo.even_bonus=0.5 --name bonus05   # an experiment (`dvc exp save`)
    python -m flows.pipeline --push                            # `dvc push` at the end

DVC still decides what is stale, so a task whose stage is up to date returns in about a second.
Retries re-run a failed stage; its output lines stream into the Prefect logs; the metrics are
published as a table artifact and the report as a markdown artifact.
"""

import argparse
import json
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from ruamel.yaml import YAML

from flows.dvc import apply_param_overrides, require_dvc, run_streaming, stage_order

METRICS = "metrics/eval.json"
REPORT = "reports/report.md"


@task(retries=2, retry_delay_seconds=5, task_run_name="dvc repro {stage}")
def repro_stage(stage: str, repo: str, force: bool = False) -> None:
    command = ["dvc", "repro", "--single-item", stage] + (["--force"] if force else [])
    run_streaming(command, repo, get_run_logger().info)


@task(task_run_name="set params")
def set_params(repo: str, overrides: dict[str, Any]) -> None:
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
) -> list[str]:
    """Reproduce the DAG stage by stage; returns the stages in the order they ran.

    force_stage: rerun this stage even if DVC finds it up to date (later stages follow if it changes).
    params: dotted overrides, e.g. {"grpo.even_bonus": 0.5}: the run becomes a DVC experiment.
    """
    repo = str(Path(repo).resolve())
    require_dvc()  # before any task: a missing dvc is one clear line, not a retried FileNotFoundError
    stages = stage_order(repo)
    if force_stage is not None and force_stage not in stages:
        raise ValueError(f"force_stage={force_stage!r} is not a stage of dvc.yaml; stages: {stages}")
    if params:
        set_params(repo, params)
    for stage in stages:
        repro_stage(stage, repo, force=stage == force_stage)
    if params:
        save_experiment(repo, experiment_name)
    publish(repo)
    if push_at_end:
        push(repo, remote)
    return stages


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
    parser.add_argument("--force", dest="force_stage", help="rerun this stage even if up to date")
    parser.add_argument("--set", "-S", action="append", default=[], metavar="KEY=VALUE", help="param override")
    parser.add_argument("--name", dest="experiment_name", help="experiment name (with --set)")
    parser.add_argument("--push", dest="push_at_end", action="store_true", help="dvc push at the end")
    parser.add_argument("--remote", help="DVC remote for --push (default: the default remote)")
    args = parser.parse_args()
    pipeline(
        repo=args.repo,
        force_stage=args.force_stage,
        params=_parse_set(args.set) or None,
        experiment_name=args.experiment_name,
        push_at_end=args.push_at_end,
        remote=args.remote,
    )


if __name__ == "__main__":
    main()
