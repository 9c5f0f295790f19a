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
