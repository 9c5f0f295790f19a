"""What portable numerics cost: each stage of the default DAG run under `numerics: portable` and `native`,
interleaved, in one throwaway copy of the project.

    PYTHONPATH=. python benchmarks/numerics.py [--scale 0.25] [--stages base sft grpo] [--repeats 1]

Stages run in DAG order as `python -m stages.<name>` (what `dvc repro` runs), each once per mode per repeat,
the mode that goes first alternating from stage to stage and repeat to repeat, so a drift in the machine's speed
falls on both modes alike. `--scale` multiplies every training loop's steps (and the grid's transitions), so
a run takes minutes; the ratio per stage is what the script is for. Each stage's outputs are hashed after each
run (downstream stages read whichever mode ran last: their times do not depend on it): `outputs_differ` says whether the two modes gave different bytes on this machine (they do where it has
AVX-512 and a kernel sums in another order).

Prints one JSON object: per stage the wall and CPU seconds of each run, the median per mode, and native / portable
(wall and CPU: on a shared machine the CPU ratio is the steadier one).
"""

import argparse
import hashlib
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from ruamel.yaml import YAML

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from flows.dvc import apply_param_overrides  # noqa: E402  (params set as `dvc exp run -S` sets them)
from tests.dag import make_project, stages_in_order  # noqa: E402  (the same throwaway-project builder the tests use)

ORDER = stages_in_order()  # dvc.yaml's stages, each after the ones it reads (source: the project builds base)
STEP_KEYS = [  # the loops --scale shortens
    "base.steps",
    "sft.steps",
    "grpo.steps",
    "nla_sft.steps",
    "nla_rl.grpo.steps",
    "nla_rl.ppo.steps",
    "grid.transitions",
    "policy.awr.steps_per_iteration",
]


def lookup(params: dict, key: str):
    for part in key.split("."):
        params = params[part]
    return params


def tree_hash(paths: list[Path]) -> str:
    digest = hashlib.sha256()
    for path in paths:
        files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        for file in files:
            digest.update(str(file.relative_to(path.parent)).encode())
            digest.update(file.read_bytes())
    return digest.hexdigest()[:16]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", type=float, default=0.25, help="multiplies every loop's steps (1: the default DAG)")
    parser.add_argument("--stages", nargs="+", default=ORDER, help="stages to time (their inputs are still built)")
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        project = make_project(tmp / "project", tmp / "home")
        params_file = project.root / "params.yaml"
        params_file.write_text((ROOT / "params.yaml").read_text())  # the default DAG, not the tests' tiny one
        defaults = YAML(typ="safe").load(params_file.read_text())
        scaled = {key: max(1, round(lookup(defaults, key) * args.scale)) for key in STEP_KEYS}
        scaled["surgery.phases"] = [max(2, round(n * args.scale)) for n in defaults["surgery"]["phases"]]
        apply_param_overrides(params_file, scaled)
        stages = YAML(typ="safe").load((project.root / "dvc.yaml").read_text())["stages"]
        env = {**project.env, "PYTHONPATH": ""}

        results, first = {}, 0
        for name in ORDER:
            timed = name in args.stages and "numerics" in stages[name].get("params", [])
            modes = ["portable", "native"] if timed else ["portable"]
            seconds = {mode: [] for mode in modes}
            cpu_seconds = {mode: [] for mode in modes}  # the stage's CPU time: less moved by other jobs than wall
            hashes = {}
            for repeat in range(args.repeats if timed else 1):
                order = modes if (first + repeat) % 2 == 0 else modes[::-1]
                for mode in order:
                    apply_param_overrides(params_file, {"numerics": mode})
                    print(f"{name} ({mode}, repeat {repeat})", file=sys.stderr, flush=True)
                    start, cpu = time.perf_counter(), resource.getrusage(resource.RUSAGE_CHILDREN)
                    subprocess.run(
                        [sys.executable, "-m", f"stages.{name}"],
                        cwd=project.root,
                        env=env,
                        check=True,
                        capture_output=True,
                    )
                    seconds[mode].append(time.perf_counter() - start)
                    after = resource.getrusage(resource.RUSAGE_CHILDREN)
                    cpu_seconds[mode].append(after.ru_utime + after.ru_stime - cpu.ru_utime - cpu.ru_stime)
                    hashes[mode] = tree_hash([project.root / out for out in stages[name].get("outs", [])])
            apply_param_overrides(params_file, {"numerics": "portable"})
            if timed:
                first += 1
                median = {mode: statistics.median(values) for mode, values in seconds.items()}
                cpu_median = {mode: statistics.median(values) for mode, values in cpu_seconds.items()}
                results[name] = {
                    "seconds": seconds,
                    "cpu_seconds": cpu_seconds,
                    "median": median,
                    "native_over_portable": round(median["native"] / median["portable"], 3),
                    "native_over_portable_cpu": round(cpu_median["native"] / cpu_median["portable"], 3),
                    "outputs_differ": hashes["native"] != hashes["portable"],
                }

    totals = {mode: sum(r["median"][mode] for r in results.values()) for mode in ("portable", "native")}
    cpu_totals = {
        mode: sum(statistics.median(r["cpu_seconds"][mode]) for r in results.values())
        for mode in ("portable", "native")
    }
    print(
        json.dumps(
            {
                "scale": args.scale,
                "repeats": args.repeats,
                "threads": 1,
                "cpu": platform.processor() or platform.machine(),
                "cpu_flags_avx512": "avx512f" in Path("/proc/cpuinfo").read_text(),
                "stages": results,
                "total_seconds": totals,
                "total_native_over_portable": round(totals["native"] / totals["portable"], 3),
                "total_cpu_seconds": cpu_totals,
                "total_native_over_portable_cpu": round(cpu_totals["native"] / cpu_totals["portable"], 3),
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    os.environ.setdefault("LATENTLAB_THREADS", "1")
    main()
