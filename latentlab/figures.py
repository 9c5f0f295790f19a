"""Report building blocks: a markdown comparison table and the figures (matplotlib, PNG)."""

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
import polars as pl  # noqa: E402

COLUMNS = {
    "accuracy": "accuracy",
    "accuracy_odd": "acc. odd y",
    "accuracy_even": "acc. even y",
    "mae": "MAE",
    "parse_rate": "parsed",
    "even_prediction_rate": "even predictions",
    "reward": "reward",
    "trained_parameters": "trained params",
}


def _cell(value) -> str:
    if value is None:
        return "–"
    if isinstance(value, int):
        return f"{value:,}"
    return f"{value:.3f}"


def comparison_table(metrics: dict[str, dict], columns: dict[str, str] = COLUMNS) -> str:
    """One markdown row per model, one column per metric (`columns`: key -> header)."""
    header = "| model | " + " | ".join(columns.values()) + " |"
    rule = "|---|" + "---:|" * len(columns)
    rows = [f"| {name} | " + " | ".join(_cell(m.get(k)) for k in columns) + " |" for name, m in metrics.items()]
    return "\n".join([header, rule, *rows])


def plot_training_curves(curves: dict[str, tuple[pl.DataFrame, list[str]]], path: Path) -> None:
    """One panel per training stage: `curves[name] = (log table, columns to draw)`."""
    fig, axes = plt.subplots(1, len(curves), figsize=(4.5 * len(curves), 3.9), squeeze=False)
    for ax, (name, (table, columns)) in zip(axes[0], curves.items()):
        for column in columns:
            if column in table.columns:
                rows = table.filter(pl.col(column).is_not_null())
                ax.plot(rows["step"], rows[column], label=column)
        ax.set_title(name)
        ax.set_xlabel("step")
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.22), ncol=2, frameon=False)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")  # the legends sit under the axes, off the curves
    plt.close(fig)


def plot_accuracy_by_parity(metrics: dict[str, dict], path: Path) -> None:
    """Grouped bars: accuracy on odd-y and even-y problems for each model."""
    names = list(metrics)
    fig, ax = plt.subplots(figsize=(1.2 + 1.3 * len(names), 3.4))
    width = 0.38
    for offset, parity in ((-width / 2, "odd"), (width / 2, "even")):
        values = [metrics[n][f"accuracy_{parity}"] for n in names]
        bars = ax.bar([i + offset for i in range(len(names))], values, width, label=f"{parity} y")
        ax.bar_label(bars, fmt="%.3f", fontsize=7)
    ax.set_xticks(range(len(names)), names)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("exact-match accuracy")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_parameters_vs_accuracy(metrics: dict[str, dict], path: Path) -> None:
    """Trainable parameters (log scale) against accuracy, one point per trained model."""
    points = {n: m for n, m in metrics.items() if m.get("trained_parameters")}
    fig, ax = plt.subplots(figsize=(4.5, 3.4))
    for name, m in points.items():
        ax.scatter(m["trained_parameters"], m["accuracy"])
        ax.annotate(
            name, (m["trained_parameters"], m["accuracy"]), fontsize=8, xytext=(4, 4), textcoords="offset points"
        )
    ax.set_xscale("log")
    ax.set_xlabel("trained parameters")
    ax.set_ylabel("accuracy")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _number(value) -> str:
    if value is None:
        return "–"
    return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.3f}"


def interval_table(rows: list[dict]) -> str:
    """Sweep rows (config, metric, n, mean, std, low, high, seeds, experiments) as a markdown table."""
    lines = [
        "| configuration | metric | mean | 95% interval | std | n | seeds | experiments |",
        "|---|---|---:|---|---:|---:|---|---|",
    ]
    for r in rows:
        config = ", ".join(f"{k}={v}" for k, v in r["config"].items()) or "(defaults)"
        interval = "–" if r["low"] is None else f"[{_number(r['low'])}, {_number(r['high'])}]"
        seeds, names = ", ".join(map(str, r["seeds"])), ", ".join(r["experiments"])
        lines.append(
            f"| {config} | {r['metric']} | {_number(r['mean'])} | {interval} | {_number(r['std'])} | {r['n']} "
            f"| {seeds} | {names} |"
        )
    return "\n".join(lines)


def provenance_lines(sweep: dict) -> list[str]:
    """Where a sweep's numbers come from: command, commit, seeds, stages, interval method."""
    return [
        f"Command `{sweep['command']}` on commit `{sweep['baseline'][:7]}`; seeds {sweep['seeds']}; "
        f"stages: {', '.join(sweep['targets']) or 'the whole DAG'}.",
        f"Intervals: {sweep['interval']}.",
    ]


def interval_cell(row: dict | float | int | None) -> str:
    """A sweep row as `mean [low, high]` (a plain number as itself; `–` for nothing)."""
    if row is None or isinstance(row, int | float):
        return _number(row)
    if row["low"] is None:
        return _number(row["mean"])
    return f"{_number(row['mean'])} [{_number(row['low'])}, {_number(row['high'])}]"


def summary_table(first: str, columns: list[str], rows: dict[str, dict]) -> str:
    """`rows[label][column]` (sweep rows or numbers) as a markdown table, `first` heading the label column."""
    lines = [f"| {first} | " + " | ".join(columns) + " |", "|---|" + "---|" * len(columns)]
    lines += [
        f"| {label} | " + " | ".join(interval_cell(cells.get(c)) for c in columns) + " |"
        for label, cells in rows.items()
    ]
    return "\n".join(lines)


def claims_markdown(claims: dict) -> str:
    """The report's Claims section body from results/claims.json (written by `flows.sweep --claims`)."""
    if not claims.get("claims"):
        return "The claims file holds no claims yet: run the claims sweep (docs: how-to/sweep.md)."
    parts = []
    for claim in claims["claims"].values():
        counts = claim["sweep"]["counts"]
        parts += [
            f"### {claim['title']}",
            "",
            *provenance_lines(claim["sweep"]),
            f"{counts['total']} experiments, {counts['failed']} failed.",
            "",
            interval_table(claim["rows"]),
            "",
        ]
    return "\n".join(parts)


def plot_sweep(
    rows: list[dict], key: str, path: Path, metrics: tuple[str, ...] = ("accuracy", "accuracy_even")
) -> None:
    """Mean and 95% interval against the swept `key`: a panel per metric, a line per model (and per setting of
    the other swept keys). Only `model.metric` rows (metrics/eval.json) are drawn."""
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.5 * len(metrics), 3.4), squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        lines: dict[str, list[tuple[str, float, float]]] = {}
        for r in rows:
            model, _, leaf = r["metric"].rpartition(".")
            if leaf != metric or ":" in r["metric"] or " " in r["metric"] or key not in r["config"]:
                continue
            others = ", ".join(f"{k}={v}" for k, v in r["config"].items() if k != key)
            half = 0.0 if r["low"] is None else r["high"] - r["mean"]
            lines.setdefault(model + (f" ({others})" if others else ""), []).append((r["config"][key], r["mean"], half))
        for label, points in lines.items():
            xs = [p[0] for p in points]
            try:
                xs = [float(x) for x in xs]
            except ValueError:
                pass  # categorical values: matplotlib places the strings in order
            ax.errorbar(xs, [p[1] for p in points], yerr=[p[2] for p in points], marker="o", capsize=3, label=label)
        ax.set_title(f"{metric} (mean, 95% interval)")
        ax.set_xlabel(key)
        ax.grid(alpha=0.3)
        if lines:
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
