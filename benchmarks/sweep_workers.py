"""Wall time of one sweep run by 1 and by 2 Prefect workers of a process work pool. Prints JSON.

    PYTHONPATH=. python benchmarks/sweep_workers.py                        # tiny params (tests/dag.py), ~10 min
    PYTHONPATH=. python benchmarks/sweep_workers.py --params default --values 0,0.2 --seeds 1 --targets grpo

For each worker count: a fresh copy of the project (its own git repo and empty DVC cache, so neither
measurement restores what the other computed), a work pool on one real local `prefect server`, N workers
(`prefect worker start --pool ... --type process --limit 1`) with the machine's cores split between them
(params.yaml `threads` = cores // N), then `python -m flows.sweep` timed from start to summary. The two sweeps
run the same experiments from the same start; only the worker count differs.
"""

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from flows.dvc import apply_param_overrides  # noqa: E402  (params set as `dvc exp run -S` sets them)
from tests.dag import make_project  # noqa: E402  (the same throwaway-project builder the tests use)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(home: Path, env: dict) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = {**env, "PREFECT_HOME": str(home), "PREFECT_SERVER_UI_ENABLED": "false"}
    log = (home / "server.log").open("w")
    server = subprocess.Popen(
        ["prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)], env=env, stdout=log, stderr=log
    )
    api = f"http://127.0.0.1:{port}/api"
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            if httpx.get(f"{api}/health", timeout=2).status_code == 200:
                return server, api
        except httpx.HTTPError:
            time.sleep(0.5)
    server.kill()
    raise RuntimeError(f"prefect server did not start: {(home / 'server.log').read_text()[-2000:]}")


def stop(proc: subprocess.Popen, grace: float = 30) -> None:
    """SIGTERM, then SIGKILL after `grace` seconds: once the sweep is timed, a worker slow to shut down (one took
    over 60 s after its sweep had finished) must not fail the measurement."""
    proc.terminate()
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        print(f"{' '.join(proc.args[:3])} did not stop within {grace:.0f} s of SIGTERM: killed", file=sys.stderr)
        proc.kill()
        proc.wait()


def timed_sweep(workers: int, args, root: Path, server_env: dict) -> dict:
    project = make_project(root / f"project{workers}", root / f"home{workers}")
    if args.params == "default":  # make_project wrote the tiny params; put the repository's back
        (project.root / "params.yaml").write_text((Path(__file__).resolve().parents[1] / "params.yaml").read_text())
        project.run("git", "commit", "-qam", "default params")
    pool = f"bench{workers}"
    threads = max(1, (os.cpu_count() or 1) // workers)  # the stages' thread count is the `threads` param
    apply_param_overrides(project.root / "params.yaml", {"threads": threads})
    project.run("git", "commit", "-qam", f"threads {threads}", "--allow-empty")
    env = {**project.env, **server_env}
    subprocess.run(
        ["prefect", "work-pool", "create", pool, "--type", "process"], env=env, check=True, capture_output=True
    )
    logs = [(root / f"worker{workers}-{i}.log").open("w") for i in range(workers)]
    procs = [
        subprocess.Popen(
            ["prefect", "worker", "start", "--pool", pool, "--type", "process", "--limit", "1"],
            cwd=project.root,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        for log in logs
    ]
    try:
        command = ["python", "-m", "flows.sweep", "--pool", pool, "-S", f"grpo.even_bonus={args.values}"]
        command += ["--seeds", str(args.seeds), "--targets", *args.targets, "--name", "bench"]
        started = time.perf_counter()
        result = subprocess.run(command, cwd=project.root, env=env, capture_output=True, text=True)
        wall = time.perf_counter() - started
        if result.returncode:
            raise RuntimeError(
                f"sweep with {workers} worker(s) failed:\n{result.stdout[-3000:]}{result.stderr[-3000:]}"
            )
        summary = json.loads((project.root / "results/sweeps/bench/summary.json").read_text())
    finally:
        for proc in procs:
            stop(proc)
    return {
        "workers": workers,
        "threads_per_worker": threads,
        "wall_seconds": round(wall, 1),
        "experiments": summary["counts"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--params", choices=["tiny", "default"], default="tiny")
    parser.add_argument("--values", default="0,0.1,0.2", help="grpo.even_bonus values")
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--targets", nargs="+", default=["grpo"])
    args = parser.parse_args()
    os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"  # prefect, dvc beside python
    with tempfile.TemporaryDirectory(prefix="sweep-bench-") as tmp:
        root = Path(tmp)
        (root / "prefect").mkdir()
        server, api = start_server(root / "prefect", dict(os.environ))
        server_env = {"PREFECT_API_URL": api, "PREFECT_HOME": str(root / "prefect")}
        try:
            runs = [timed_sweep(n, args, root, server_env) for n in (1, 2)]
        finally:
            stop(server, grace=60)
    result = {
        "cores": os.cpu_count(),
        "params": args.params,
        "sweep": {"grpo.even_bonus": args.values, "seeds": args.seeds, "targets": args.targets},
        "runs": runs,
        "speedup_2_over_1": round(runs[0]["wall_seconds"] / runs[1]["wall_seconds"], 3),
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
