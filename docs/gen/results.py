"""Results pages from the committed JSON: the claims (results/claims.json), the sweeps (results/sweeps/*/summary.json)
and the benchmark runs (results/*-benchmark.json). Every figure is read from its file, and every table says which
file, commit and machine it comes from."""

import json
import subprocess
from functools import cache
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "results"


def load(path: str | Path) -> dict:
    return json.loads((ROOT / path).read_text())


@cache
def last_commit(path: str) -> str:
    """The commit that last changed a committed file (`git log -1`), or '' outside a git checkout."""
    found = subprocess.run(
        ["git", "log", "-1", "--format=%h", "--", path], cwd=ROOT, capture_output=True, text=True, check=False
    )
    return found.stdout.strip()


def dig(data, key: str):
    """data["a"]["b"]... for key "a.b"; a list index may be a part ("runs.0.x")."""
    for part in key.split("."):
        data = data[int(part)] if isinstance(data, list) else data[part]
    return data


def machine(data: dict) -> str:
    for key in ("settings.machine", "machine", "cpu"):
        try:
            found = dig(data, key)
        except (KeyError, IndexError, TypeError):
            continue
        if isinstance(found, dict):
            return ", ".join(f"{k} {v}" for k, v in found.items())
        return str(found) + (f", {data['cores']} cores" if "cores" in data else "")
    return f"{data['cores']} cores" if "cores" in data else ""


def provenance(path: str) -> str:
    """`Source: file; commit ...; machine ...`: the commit and machine the JSON records, else the commit that last
    changed the file (said as such) and 'not recorded'."""
    data = load(path)
    commit = next((c for c in (data.get("commit"), data.get("baseline")) if c), None)
    if commit:
        when = f"run on commit `{commit[:7]}`"
    else:
        changed = last_commit(path)
        when = f"commit not recorded in the file; the file was last changed in `{changed}`" if changed else ""
        when = when or "commit not recorded in the file"
    where = machine(data)
    return f"Source: `{path}`; {when}; machine: {where or 'not recorded in the file'}."


def number(value) -> str:
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):  # three decimals at most, trailing zeros dropped; thousands grouped
        return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.3f}".rstrip("0").rstrip(".")
    return str(value)


def value(path: str, key: str, style: str = "") -> str:
    """One figure of a committed JSON, formatted: `style` is a format spec ('.1f'), or '' for `number`."""
    found = dig(load(path), key)
    return format(found, style) if style else number(found)


# --- claims -------------------------------------------------------------------------------------------------------


def _config(config: dict) -> str:
    return ", ".join(f"`{k}={v}`" for k, v in config.items()) or "defaults"


def _interval(row: dict) -> str:
    return "–" if row["low"] is None else f"[{number(row['low'])}, {number(row['high'])}]"


def claim(claim_id: str, level: int = 3) -> str:
    """One claim of results/claims.json: what was swept, where, and each metric's mean and 95% interval."""
    from flows.claims import EARLIER_MODEL, stale_claims, verdict_lines

    claims = load("results/claims.json")
    if claim_id not in claims["claims"]:
        raise KeyError(f"claim {claim_id!r} is not in results/claims.json (it has {sorted(claims['claims'])})")
    entry, stale = claims["claims"][claim_id], stale_claims(claims)
    sweep = entry["sweep"]
    model = entry.get("model", EARLIER_MODEL)
    parts = [f"{'#' * level} {entry['title']}", ""]
    if claim_id in stale:
        parts += [
            f'!!! warning "Withdrawn: `{claim_id}` was swept before its metrics changed meaning"',
            f"    {stale[claim_id]}. Its numbers are of the old definition; the report leaves them out until the "
            f"sweep reruns (`--claims {claim_id}`).",
            "",
        ]
    parts += [
        f"Claim `{claim_id}`: `{sweep['command']}` on commit `{sweep['baseline'][:7]}`, seeds "
        f"{', '.join(map(str, sweep['seeds']))}, {sweep['counts']['total']} experiments "
        f"({sweep['counts']['failed']} failed); model: "
        + ", ".join(f"{k} {v}" for k, v in model.items() if v is not None)
        + f". Source: `results/claims.json` (machine not recorded). Intervals: {sweep['interval']}.",
        "",
    ]
    if claim_id in stale:
        return "\n".join(parts)
    if verdicts := verdict_lines(claim_id, entry):
        parts += [*verdicts, ""]
    parts += ["| metric | configuration | mean | 95% interval | n |", "|---|---|---:|---|---:|"]
    for row in entry["rows"]:
        parts.append(
            f"| `{row['metric']}` | {_config(row['config'])} | {number(row['mean'])} | {_interval(row)} | {row['n']} |"
        )
    return "\n".join(parts + [""])


def claims_page() -> str:
    claims = load("results/claims.json")["claims"]
    parts = [
        "# Claims over seeds",
        "",
        "Each headline claim of the five systems, measured over seeds by `python -m flows.sweep --claims ...` "
        "([Run a sweep](../how-to/sweep.md)) and stored in `results/claims.json`; the report stage prints the "
        "same file. Generated from that file at build time.",
        "",
    ]
    return "\n".join(parts + [claim(claim_id, 2) for claim_id in claims])


# --- sweeps -------------------------------------------------------------------------------------------------------


def sweeps() -> list[str]:
    return sorted(p.parent.name for p in RESULTS.glob("sweeps/*/summary.json"))


def sweep_page(name: str) -> str:
    """The sweep's own summary page (flows/sweep_results.py's markdown, the one `sweep.md` holds), from its JSON."""
    from flows.sweep_results import markdown

    summary = load(f"results/sweeps/{name}/summary.json")
    text = markdown(name, summary)
    source = provenance(f"results/sweeps/{name}/summary.json")
    return text.replace("\n", f"\n\n{source}\n", 1)


def sweeps_page() -> str:
    parts = [
        "# Sweeps",
        "",
        "Every sweep committed under `results/sweeps/`, one page each, generated from its `summary.json`.",
        "",
        "| sweep | command | commit | experiments |",
        "|---|---|---|---:|",
    ]
    for name in sweeps():
        summary = load(f"results/sweeps/{name}/summary.json")
        parts.append(
            f"| [{name}]({name}/index.md) | `{summary['command']}` | `{summary['baseline'][:7]}` "
            f"| {summary['counts']['total']} |"
        )
    return "\n".join(parts + [""])


# --- benchmarks ---------------------------------------------------------------------------------------------------


def benchmarks() -> list[str]:
    return sorted(p.name.removesuffix("-benchmark.json") for p in RESULTS.glob("*-benchmark.json"))


def _table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
    return "\n".join(lines + ["| " + " | ".join(number(c) for c in row) + " |" for row in rows])


def _dag(data: dict) -> str:
    stages = list(next(iter(data["runs"].values()))["stages"])
    runs = data["runs"]
    rows = [[f"`{s}`", *(r["stages"].get(s) for r in runs.values())] for s in stages]
    rows += [["**whole run, s**", *(r["seconds"] for r in runs.values())]]
    rows += [["minutes", *(r["minutes"] for r in runs.values())]]
    rows += [["no-op `dvc repro`, s", *(r["noop_dvc_repro_s"] for r in runs.values())]]
    rows += [["reproduced `dvc.lock`", *(r["reproduced_dvc_lock"] for r in runs.values())]]
    header = ["stage, s", *(f"`{k}`" for k in runs)]
    return (
        "Each run forces every stage in a fresh clone: `flow:N` is `python -m flows.pipeline --force all --jobs N`, "
        "`dvc` is `dvc repro --force`.\n\n" + _table(header, rows)
    )


def _numerics(data: dict) -> str:
    rows = [
        [f"`{name}`", s["median"]["portable"], s["median"]["native"], s["native_over_portable_cpu"],
         s["native_over_portable"], s["outputs_differ"]]
        for name, s in data["stages"].items()
    ]  # fmt: skip
    rows.append(
        ["**all**", data["total_seconds"]["portable"], data["total_seconds"]["native"],
         data["total_native_over_portable_cpu"], data["total_native_over_portable"], None]
    )  # fmt: skip
    header = ["stage", "wall s, portable", "wall s, native", "native / portable, CPU", "native / portable, wall",
              "bytes differ"]  # fmt: skip
    return (
        f"Each stage at `--scale {data['scale']}` of its steps, `--repeats {data['repeats']}` per mode, interleaved; "
        f"medians. CPU time is the ratio to read: wall times move with other jobs on the machine.\n\n"
        + _table(header, rows)
    )


def _memory(data: dict) -> str:
    rows = []
    for name, run in data["runs"].items():
        peak = max(run["peak_rss_mb_per_rank"])
        active = run["activation_mb_per_rank"]
        rows.append([f"`{name}`", peak, max(active) if active else None, run["seconds_per_step"],
                     run["trainable_params"]])  # fmt: skip
    ratios = [[f"`{k}`", r["value"], r["goal"], r["goal_met"]] for k, r in data["ratios"].items()]
    header = ["config / step", "peak MB per rank", "activations MB", "s / step", "trained params"]
    return (
        _table(header, rows)
        + "\n\nRatios and the goals they were held to:\n\n"
        + _table(["ratio", "value", "goal", "met"], ratios)
    )


def _goals(data: dict) -> str:
    rows = []
    for name, goal in data["goals"].items():
        figures = {k: v for k, v in goal.items() if isinstance(v, int | float) and not isinstance(v, bool)}
        shown = ", ".join(f"{k} {number(v)}" for k, v in figures.items())
        rows.append([f"`{name}`", goal["goal"], shown, goal.get("goal_met")])
    return _table(["measurement", "goal", "figures", "met"], rows)


def _leaves(data, prefix: str = "") -> list[tuple[str, object]]:
    found = []
    for key, item in data.items():
        name = f"{prefix}{key}"
        if isinstance(item, dict):
            found += _leaves(item, f"{name}.")
        elif isinstance(item, list) and len(item) > 6:
            continue
        else:
            found.append((name, item))
    return found


def _all_figures(data: dict) -> str:
    lines = ["| key | value |", "|---|---:|"]
    for key, item in _leaves(data):
        shown = ", ".join(number(v) for v in item) if isinstance(item, list) else number(item)
        lines.append(f"| `{key}` | {str(shown).replace('|', '/')} |")
    return "\n".join(lines)


RENDERERS = {"dag": _dag, "numerics": _numerics, "memory": _memory}
SCRIPTS = {  # benchmark name -> the script that writes it, when the name does not say
    "dag": "benchmarks/dag.py",
}


def benchmark(name: str, level: int = 2) -> str:
    """One benchmark run: its script, where it ran, its main table and (folded) every figure of its JSON."""
    path = f"results/{name}-benchmark.json"
    data = load(path)
    script = SCRIPTS.get(name, f"benchmarks/{name.replace('-', '_')}.py")
    parts = [f"{'#' * level} `{name}`", "", f"Script: `{script}`. {provenance(path)}", ""]
    if name in RENDERERS:
        parts += [RENDERERS[name](data), ""]
    elif "goals" in data:
        parts += [_goals(data), ""]
    parts += [f'??? note "Every figure of `{path}`"', ""]
    parts += ["    " + line for line in _all_figures(data).splitlines()]
    return "\n".join(parts + [""])


def benchmarks_page() -> str:
    parts = [
        "# Benchmarks",
        "",
        "One committed JSON per benchmark run, `results/<name>-benchmark.json`, written by the script in "
        "`benchmarks/` (`make bench` runs them all; each prints one JSON object). A rerun replaces the file, so the "
        "history of a benchmark is the git history of its file. Generated at build time; each section names its "
        "file, the commit and the machine.",
        "",
    ]
    return "\n".join(parts + [benchmark(name) for name in benchmarks()])
