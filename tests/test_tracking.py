"""StepLog's DVCLive files: syncing the summary now and then leaves the same files as a sync after every row."""

from pathlib import Path

from latentlab.common.tracking import StepLog, start_dvclive

ROWS = [
    {"step": 0, "loss": 2.0, "seconds_per_step": 0.5},
    {"step": 1, "loss": 1.5, "seconds_per_step": 0.4},
    {"step": 2, "loss": 1.25, "accuracy": 0.5, "seconds_per_step": 0.3},
    {"step": 3, "loss": 1.0, "seconds_per_step": 0.2},
]


def _live_files(directory: Path, sync_seconds: float, syncs: int) -> dict[str, str]:
    live = start_dvclive(directory)
    steps, next_step = [], live.next_step
    live.next_step = lambda: (steps.append(live.step), next_step())[1]  # counted, then DVCLive's own
    log = StepLog(live=live)
    log.LIVE_SYNC_SECONDS = sync_seconds
    for row in ROWS:
        log.log(**row)
    log.finish()
    assert steps == [row["step"] for row in ROWS][:syncs]
    return {
        str(path.relative_to(directory)): path.read_text() for path in sorted(directory.rglob("*")) if path.is_file()
    }


def test_throttled_live_sync_writes_the_same_files(tmp_path):
    every_row = _live_files(tmp_path / "every", 0.0, syncs=4)
    at_the_end = _live_files(tmp_path / "end", 3600.0, syncs=1)  # the first row only
    assert at_the_end == every_row
    assert '"step": 3' in every_row["metrics.json"] and '"loss": 1.0' in every_row["metrics.json"]
    assert every_row["plots/metrics/loss.tsv"].splitlines() == ["step\tloss", "0\t2.0", "1\t1.5", "2\t1.25", "3\t1.0"]
    assert every_row["plots/metrics/accuracy.tsv"].splitlines() == ["step\taccuracy", "2\t0.5"]
    assert not any("seconds" in name for name in every_row)  # speed stays out of the deterministic files
