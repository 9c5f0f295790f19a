"""Per-step training logs: a CSV for `dvc plots`, DVCLive and W&B when switched on, and the progress bar."""

import os
import time
from pathlib import Path
from typing import Any

import polars as pl
from tqdm.auto import tqdm

from latentlab.common.atomic import atomic_output


def progress(iterable, desc: str, **kwargs):
    """The one progress bar style of the project (to stderr, so DVC and Prefect stream it); under torchrun
    rank 0's alone."""
    kwargs.setdefault("disable", os.environ.get("RANK", "0") != "0")
    return tqdm(iterable, desc=desc, dynamic_ncols=True, mininterval=1.0, **kwargs)


def start_wandb(mode: str, project: str, name: str, config: dict[str, Any], directory: str | Path = "."):
    """A W&B run, or None when `mode` is 'disabled'. 'offline' never needs a login or the network."""
    mode = os.environ.get("WANDB_MODE", mode)
    if mode == "disabled":
        return None
    import wandb  # imported only when used: it is slow to import

    return wandb.init(project=project, name=name, mode=mode, config=config, dir=str(directory))


def start_dvclive(directory: str | Path):
    """A DVCLive logger writing `directory`/metrics.json and `directory`/plots/metrics/<metric>.tsv.

    DVC reads them: `dvc exp show` (the last values), `dvc plots show/diff` (the curves), also while
    an experiment runs. The stage declares them in dvc.yaml, so DVCLive touches neither dvc.yaml nor
    git (dvcyaml=None, save_dvc_exp=False); no timestamps, so the files are the same for the same seed.
    """
    from dvclive import Live  # imported only when used

    live = Live(str(directory), dvcyaml=None, save_dvc_exp=False, report=None)
    Path(live.plots_dir, "metrics").mkdir(parents=True, exist_ok=True)  # a declared output even if nothing is logged
    return live


def is_speed(metric: str) -> bool:
    """Wall-clock measurements (tokens_per_s, seconds_per_step): they differ on every run."""
    return metric.endswith("_per_s") or metric.startswith("seconds")


def _write_csv(rows: list[dict[str, Any]], path: str | Path) -> None:
    table = pl.from_dicts(rows, infer_schema_length=None) if rows else pl.DataFrame({"step": []})
    with atomic_output(path) as partial:
        table.write_csv(partial)


class StepLog:
    """Collects one row of metrics per logged step; `save` writes them as CSV in one atomic step.

    Speed columns go to a file of their own, so the main log is identical for the same seed and a
    rerun does not make the stages that read it look stale. A DVCLive `live` gets the same rows as they
    come, speed columns left out (they stay in the speed CSV), so its files are deterministic too.
    """

    # DVCLive's next_step() rewrites metrics.json and re-reads every metric's whole history to offer it to
    # DVC Studio, configured or not: quadratic in steps, 15 ms a step by step 400 of the grpo stage (6% of
    # it). The live files get each row as it comes; that sync runs at most this often, and at the end.
    LIVE_SYNC_SECONDS = 2.0

    def __init__(self, wandb_run=None, bar=None, live=None):
        self.rows: list[dict[str, Any]] = []
        self.wandb_run = wandb_run
        self.bar = bar
        self.live = live
        self._live_synced = -float("inf")  # the first row syncs: metrics.json's key order does not depend on timing

    def log(self, step: int, **metrics: float) -> None:
        self.rows.append({"step": step, **metrics})
        if self.wandb_run is not None:
            self.wandb_run.log(metrics, step=step)
        if self.live is not None:
            self.live.step = step
            for name, value in metrics.items():
                if not is_speed(name) and value is not None:
                    self.live.log_metric(name, value)
            if time.monotonic() - self._live_synced >= self.LIVE_SYNC_SECONDS:
                self.live.next_step()  # summary, Studio, the VS Code extension's step signal
                self._live_synced = time.monotonic()
        if self.bar is not None:
            self.bar.set_postfix({k: f"{v:.4g}" for k, v in metrics.items() if isinstance(v, float)}, refresh=False)

    def save(self, path: str | Path, speed_path: str | Path | None = None) -> None:
        """Write the log to `path` and its speed columns to `speed_path` (default: `<name>_speed.csv`)."""
        path = Path(path)
        speed_path = speed_path or path.with_name(f"{path.stem}_speed.csv")
        _write_csv([{k: v for k, v in row.items() if not is_speed(k)} for row in self.rows], path)
        _write_csv([{k: v for k, v in row.items() if k == "step" or is_speed(k)} for row in self.rows], speed_path)

    def finish(self) -> None:
        if self.wandb_run is not None:
            self.wandb_run.finish()
        if self.live is not None:
            if self.rows:  # the summary of the last row, as a next_step() after every row would leave it
                self.live.step = self.rows[-1]["step"]
                self.live.make_summary()
            self.live.end()


def write_side_by_side(logs: dict[str, list[dict[str, Any]]], columns: list[str], path: str | Path) -> None:
    """One CSV of several runs' logs joined on `step`: column `<run>_<metric>` for every run and metric
    (empty where a run did not log that metric at that step), for drawing the runs side by side."""
    tables = []
    for name, rows in logs.items():
        table = pl.from_dicts(rows, infer_schema_length=None)
        kept = [c for c in columns if c in table.columns]
        tables.append(table.select("step", *[pl.col(c).alias(f"{name}_{c}") for c in kept]))
    joined = tables[0]
    for table in tables[1:]:
        joined = joined.join(table, on="step", how="full", coalesce=True)
    with atomic_output(path) as partial:
        joined.sort("step").write_csv(partial)
