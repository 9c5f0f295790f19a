"""A sweep's results: metrics of its DVC experiments -> mean, std and 95% bootstrap interval per configuration.

Written to results/sweeps/<name>/ (summary.json, sweep.md, <key>.png per swept key) and published as a
Prefect table artifact. Every row names the seeds and the experiments its numbers come from. Only the metrics
of stages the sweep ran (its targets and what they depend on) are results: an experiment's commit also holds
the other stages' metrics files, with the baseline's numbers, and those are left out and named in `not_run`.
"""

import json
import subprocess
from pathlib import Path, PurePosixPath

from ruamel.yaml import YAML

from flows.claims import DIFFERENCES, difference_name
from flows.dvc import stage_graph
from flows.stats import summarize
from latentlab.common.atomic import atomic_output
from latentlab.figures import interval_table, plot_sweep, provenance_lines

MAIN_METRICS = "metrics/eval.json"  # its keys are named without the file (`grpo.accuracy_even`)
INTERVAL = (
    "95% expanded percentile bootstrap of the mean over seeds (Hesterberg 2015; flows/stats.py): within the seeds' "
    "range, paired differences resampled per seed"
)


def _flatten(data: dict, prefix: str = "") -> dict[str, float]:
    flat = {}
    for key, value in data.items():
        if isinstance(value, dict):
            flat |= _flatten(value, f"{prefix}{key}.")
        elif isinstance(value, int | float) and not isinstance(value, bool):
            flat[f"{prefix}{key}"] = value
    return flat


def experiment_files(repo: str | Path) -> dict[str, dict[str, dict]]:
    """Every metrics file of every experiment of HEAD, as `dvc exp show` reads them: name -> {path: content}."""
    shown = subprocess.run(["dvc", "exp", "show", "--json"], cwd=repo, check=True, capture_output=True, text=True)
    found = {}
    for baseline in json.loads(shown.stdout):
        for group in baseline.get("experiments") or []:
            for rev in group["revs"]:
                files = (rev.get("data") or {}).get("metrics") or {}
                found[rev["name"]] = {path: content.get("data") or {} for path, content in files.items()}
    return found


def experiment_metrics(repo: str | Path, leave_out: set[str] | frozenset = frozenset()) -> dict[str, dict[str, float]]:
    """Every numeric metric of every experiment of HEAD but those of the files `leave_out`: name -> {metric: value}.

    Metrics of metrics/eval.json are named `model.metric`, those of other files `path:key`.
    """
    return {
        name: named_metrics({path: content for path, content in files.items() if path not in leave_out})
        for name, files in experiment_files(repo).items()
    }


def stages_run(repo: str | Path, targets: list[str]) -> set[str] | None:
    """The stages `dvc exp run <targets>` runs: the targets and every stage upstream of one (all: no targets);
    None when a target is not a stage name (a path, a glob): then nobody can tell here."""
    parents = stage_graph(repo)
    names = [target.rpartition(":")[2] for target in targets]  # dvc.yaml:grpo -> grpo
    if not names:
        return set(parents)
    if any(name not in parents for name in names):
        return None
    run: set[str] = set()
    while names:
        if (stage := names.pop()) not in run:
            run.add(stage)
            names += parents[stage]
    return run


def metric_owners(repo: str | Path, paths) -> dict[str, str]:
    """The stage of dvc.yaml that writes each metrics file of `paths`: the one listing it under `metrics:` or
    `outs:`, or with an output directory above it. A file no stage writes is left out."""
    stages = (YAML(typ="safe").load((Path(repo) / "dvc.yaml").read_text()) or {}).get("stages") or {}
    written: dict[PurePosixPath, str] = {}
    for stage, spec in stages.items():
        for entry in [*(spec.get("outs") or []), *(spec.get("metrics") or [])]:
            path = next(iter(entry)) if isinstance(entry, dict) else entry
            written[PurePosixPath(path)] = stage
    owners = {}
    for path in paths:
        file = PurePosixPath(path)
        if owner := next((written[p] for p in (file, *file.parents) if p in written), None):
            owners[path] = owner
    return owners


def named_metrics(files: dict[str, dict]) -> dict[str, float]:
    """{metrics file: its content} -> every number by its sweep name, plus the per-seed DIFFERENCES."""
    metrics = {}
    for path, content in files.items():
        for key, value in _flatten(content).items():
            metrics[key if path == MAIN_METRICS else f"{path}:{key}"] = value
    for a, b in DIFFERENCES:  # paired per seed: the interval of a difference, not of two means
        if a in metrics and b in metrics:
            metrics[difference_name(a, b)] = metrics[a] - metrics[b]
    return metrics


def summarize_sweep(repo, baseline: str, experiments, status: dict, command: str, wall_seconds: float) -> dict:
    """The summary: the runs with their status and one row per (configuration, metric) over the seeds.

    Metrics files of stages the targets do not run are left out of the rows (they are the baseline's numbers,
    whatever the configuration) and listed in `not_run` as {file: stage}.
    """
    targets = list(experiments[0].targets) if experiments else []
    files = experiment_files(repo)
    ran = stages_run(repo, targets)
    owners = metric_owners(repo, sorted({path for found in files.values() for path in found}))
    not_run = {path: stage for path, stage in owners.items() if ran is not None and stage not in ran}
    metrics = experiment_metrics(repo, leave_out=set(not_run))
    runs = []
    for e in experiments:
        run = {"name": e.name, "config": dict(e.config), "seed": e.seed, **status[e.name]}
        if e.stages:
            run["stage_seed"] = e.stage_seed
        if run["status"] != "failed" and e.name not in metrics:
            run |= {"status": "failed", "error": "finished, but `dvc exp show` does not list it"}
        runs.append(run)
    unit = experiments[0].unit if experiments else "seed"
    rows = []
    for config in dict.fromkeys(_arm(r) for r in runs):
        done = [r for r in runs if _arm(r) == config and r["status"] != "failed"]
        for metric in dict.fromkeys(m for r in done for m in metrics[r["name"]]):
            have = [r for r in done if metric in metrics[r["name"]]]
            rows.append(
                {
                    "config": dict(config),
                    "metric": metric,
                    **summarize([metrics[r["name"]][metric] for r in have]),
                    "seeds": [r.get("stage_seed", r["seed"]) for r in have],
                    "unit": unit,
                    "experiments": [r["name"] for r in have],
                }
            )
    counts = {s: sum(r["status"] == s for r in runs) for s in ("ran", "reused", "failed")}
    return {
        "command": command,
        "baseline": baseline,
        "keys": list(dict(experiments[0].config)) if experiments else [],
        "seeds": sorted({e.seed for e in experiments}),
        "unit": unit,
        "stage_seeds": sorted({e.stage_seed for e in experiments if e.stages}) or None,
        "targets": targets,
        "stages_run": sorted(ran) if ran is not None else None,
        "not_run": not_run,
        "interval": INTERVAL,
        "wall_seconds": round(wall_seconds, 1),
        "counts": {"total": len(runs), **counts},
        "experiments": runs,
        "rows": rows,
    }


def _arm(run: dict) -> tuple[tuple[str, str], ...]:
    """The arm a run's numbers are pooled in: its configuration, plus its top-level seed when the stages' own seeds
    vary (the seed then names the fixed upstream models, and the row's seeds are the stage seeds)."""
    fixed = (("seed", str(run["seed"])),) if "stage_seed" in run else ()
    return tuple(run["config"].items()) + fixed


def markdown(name: str, summary: dict) -> str:
    runs, counts = summary["experiments"], summary["counts"]
    lines = [
        f"# Sweep `{name}`",
        "",
        f"{counts['total']} experiments: {counts['ran']} ran, {counts['reused']} reused, {counts['failed']} failed "
        f"({summary['wall_seconds']:.0f} s).",
        *provenance_lines(summary),
        *_unit_lines(summary),
        "",
        "| experiment | configuration | seed | status |",
        "|---|---|---:|---|",
        *(f"| {r['name']} | {_config(r['config'])} | {_seed(r)} | {r['status']} |" for r in runs),
        "",
    ]
    failed = [r for r in runs if r["status"] == "failed"]
    if failed:
        lines += ["## Failed", "", *(f"- `{r['name']}`: {(r.get('error') or '').strip()[-600:]}" for r in failed), ""]
    shown = [r for r in summary["rows"] if ":" not in r["metric"] and not r["metric"].endswith(".n")]
    lines += ["## Results", "", interval_table(shown), ""]
    if not_run := summary.get("not_run"):
        left_out = ", ".join(f"`{path}` (stage `{stage}`)" for path, stage in not_run.items())
        lines += [
            f"Left out: the metrics of stages this sweep did not run, {left_out}: each experiment holds the "
            "baseline commit's numbers there, whatever its configuration.",
            "",
        ]
    elif summary.get("stages_run", []) is None:
        lines += ["Every metrics file is listed: a target is not a stage name, so which stages ran is not known.", ""]
    lines += [f"![{key}]({key}.png)" for key in summary["keys"]]
    return "\n".join(lines) + "\n"


def _seed(run: dict) -> str:
    return f"{run['seed']}, own {run['stage_seed']}" if "stage_seed" in run else str(run["seed"])


def _unit_lines(summary: dict) -> list[str]:
    """What the rows' seeds are: the top-level seed, or the stages' own seeds on each fixed top-level seed."""
    unit = summary.get("unit", "seed")
    if unit == "seed":
        return []
    return [
        f"Unit of variation: `{unit}` = {summary['stage_seeds']} on each top-level seed (a row per configuration and "
        "seed, over the stages' own seeds; the models upstream of them are those of that seed)."
    ]


def _config(config: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in config.items()) or "(defaults)"


def publish(repo: str | Path, name: str, summary: dict) -> Path:
    """results/sweeps/<name>/ (summary.json, sweep.md, a figure per swept key) and the Prefect table artifact."""
    from prefect.artifacts import create_table_artifact

    directory = Path(repo) / "results" / "sweeps" / name
    with atomic_output(directory) as out:
        out.mkdir(parents=True)
        (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        (out / "sweep.md").write_text(markdown(name, summary))
        for key in summary["keys"]:
            plot_sweep(summary["rows"], key, out / f"{key}.png")
    table = [
        {**{k: v for k, v in row.items() if k != "config"}, "config": _config(row["config"])}
        for row in summary["rows"]
        if ":" not in row["metric"]
    ]
    create_table_artifact(key="latentlab-sweep", table=table, description=f"{summary['command']}\n\n{INTERVAL}")
    print((directory / "sweep.md").read_text())
    return directory
