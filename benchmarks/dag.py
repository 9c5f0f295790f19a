"""The whole default DAG, forced, timed end to end and stage by stage. Prints JSON.

    PYTHONPATH=. python benchmarks/dag.py                    # the Prefect flow with --jobs 2, about 10 minutes on 2 cores
    PYTHONPATH=. python benchmarks/dag.py --runs flow:1 flow:2 dvc   # also one stage at a time, and `dvc repro --force`

Each run works in a fresh clone of this checkout's HEAD (its own DVC cache, the committed params), so nothing here
is touched and every run starts alike: `python -m flows.pipeline --force all --jobs N` (`flow:N`; each stage logs its
own wall time) or `dvc repro --force` (`dvc`; stage times are the gaps between its "Running stage" lines). Then a
no-op `dvc repro` (nothing stale: the time DVC takes to find that out), and whether the run reproduced the
committed `dvc.lock` (the same outputs, hash for hash, on this machine).
"""

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STAGE_TIME = re.compile(r"dvc repro (\w+): ([\d.]+) s")  # flows.pipeline's line at the end of each stage
RUNNING = re.compile(r"Running stage '(\w+)'")


def environment(home: Path) -> dict[str, str]:
    return {
        **os.environ,
        "PATH": str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", ""),
        "PYTHONPATH": "",
        "PREFECT_HOME": str(home / "prefect"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180",
        "DVC_NO_ANALYTICS": "1",
    }


def clone(directory: Path, env: dict[str, str]) -> None:
    subprocess.run(["git", "clone", "-q", str(ROOT), str(directory)], check=True, env=env)
    subprocess.run(["dvc", "cache", "dir", "--local", str(directory / ".cache")], cwd=directory, check=True, env=env)


def timed_lines(command: list[str], cwd: Path, env: dict[str, str]) -> tuple[float, list[tuple[float, str]]]:
    """Run `command`; -> its wall time and each output line with the second it arrived."""
    started = time.perf_counter()
    process = subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = [(time.perf_counter() - started, line.rstrip()) for line in process.stdout]
    if process.wait():
        tail = "\n".join(line for _, line in lines[-30:])
        raise RuntimeError(f"{' '.join(command)} exited {process.returncode}:\n{tail}")
    return time.perf_counter() - started, lines


def run_once(kind: str, home: Path) -> dict:
    env = environment(home)
    project = home / kind.replace(":", "-")
    clone(project, env)
    committed = (project / "dvc.lock").read_text()
    if kind == "dvc":
        seconds, lines = timed_lines(["dvc", "repro", "--force"], project, env)
        starts = [(at, m.group(1)) for at, line in lines if (m := RUNNING.search(line))]
        ends = [at for at, _ in starts[1:]] + [seconds]
        stages = {stage: round(end - at, 1) for (at, stage), end in zip(starts, ends)}
    else:
        jobs = kind.split(":")[1]
        command = [sys.executable, "-m", "flows.pipeline", "--force", "all", "--jobs", jobs]
        seconds, lines = timed_lines(command, project, env)
        stages = {m.group(1): float(m.group(2)) for _, line in lines if (m := STAGE_TIME.search(line))}
    noop, _ = timed_lines(["dvc", "repro"], project, env)
    return {
        "seconds": round(seconds, 1),
        "minutes": round(seconds / 60, 2),
        "stages": stages,
        "sum_of_stages": round(sum(stages.values()), 1),
        "noop_dvc_repro_s": round(noop, 2),
        "reproduced_dvc_lock": (project / "dvc.lock").read_text() == committed,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", nargs="+", default=["flow:2"], help="flow:N (flows.pipeline --jobs N) or dvc")
    args = parser.parse_args()
    for kind in args.runs:
        if kind != "dvc" and not re.fullmatch(r"flow:[1-9]\d*", kind):
            raise SystemExit(f"--runs: {kind!r} is neither flow:N nor dvc")
    with tempfile.TemporaryDirectory(prefix="latentlab-dag-") as tmp:
        runs = {kind: run_once(kind, Path(tmp)) for kind in args.runs}
    print(json.dumps({"cores": os.cpu_count(), "commit": _head(), "runs": runs}))


def _head() -> str:
    return subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
    ).stdout.strip()


if __name__ == "__main__":
    main()
