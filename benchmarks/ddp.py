"""Seconds per training step of `sft` and `grpo` on one process vs two torchrun processes (DDP, gloo). Prints JSON.

    PYTHONPATH=. python benchmarks/ddp.py --sft-steps 30 --grpo-steps 6

Each run is the real stage (`python -m stages.<name>`) in a scratch copy of the project's params.yaml (default
model size and batch sizes; fewer steps, no held-out monitor), on a freshly initialised default-size model as
models/base and models/sft (timing does not need a trained one). Configurations: one process with
`threads: 1`, one process with 2 threads, and `launcher.nproc: 2` with `threads: 1` per rank.
seconds_per_step is the mean over every step after the first (which pays for warm-up), from the stage's
plots/<name>_speed.csv (rank 0's clock; under DDP a step ends in the same all-reduce on every rank).
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import polars as pl
from ruamel.yaml import YAML

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from flows.dvc import apply_param_overrides  # noqa: E402  (params set as `dvc exp run -S` sets them)

CONFIGS = {"1proc_1thread": (1, 1), "1proc_2threads": (1, 2), "2proc_1thread_each": (2, 1)}


def prepare(directory: Path, sft_steps: int, grpo_steps: int) -> None:
    from latentlab.lm.modeling import build_tiny_lm, save_lm
    from latentlab.lm.tokenizer import build_char_tokenizer
    from stages.params import load_params

    yaml = YAML()
    data = yaml.load((ROOT / "params.yaml").read_text())
    data["device"], data["wandb"]["mode"] = "cpu", "disabled"
    data["sft"].update(steps=sft_steps, log_every=sft_steps)  # rows at step 0 and the last: one mean after step 0
    data["grpo"].update(steps=grpo_steps, eval_every=0)
    with (directory / "params.yaml").open("w") as handle:
        yaml.dump(data, handle)
    os.chdir(directory)
    params = load_params()
    tokenizer = build_char_tokenizer()
    model = build_tiny_lm(params.model, tokenizer)
    for name in ("base", "sft"):
        save_lm(model, tokenizer, directory / "models" / name)
    subprocess.run([sys.executable, "-m", "stages.synth"], cwd=directory, env=env(1), check=True, capture_output=True)


def env(threads: int) -> dict[str, str]:
    return {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "LATENTLAB_THREADS": str(threads),
        "OMP_NUM_THREADS": str(threads),
        "WANDB_MODE": "disabled",
    }


def measure(directory: Path, stage: str, nproc: int, threads: int) -> dict:
    # threads per process: the stages read the param, not LATENTLAB_THREADS
    apply_param_overrides(directory / "params.yaml", {"launcher.nproc": nproc, "threads": threads})
    started = time.perf_counter()
    command = [sys.executable, "-m", f"stages.{stage}"]
    subprocess.run(command, cwd=directory, env=env(threads), check=True, capture_output=True)
    wall = time.perf_counter() - started
    speed = pl.read_csv(directory / "plots" / f"{stage}_speed.csv")
    after_first = speed.filter(pl.col("step") > 0)["seconds_per_step"]
    return {"seconds_per_step": round(float(after_first.mean()), 4), "stage_wall_s": round(wall, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sft-steps", type=int, default=30)
    parser.add_argument("--grpo-steps", type=int, default=6)
    args = parser.parse_args()
    directory = Path(tempfile.mkdtemp(prefix="ddp-bench-"))
    try:
        prepare(directory, args.sft_steps, args.grpo_steps)
        results = {
            stage: {name: measure(directory, stage, *config) for name, config in CONFIGS.items()}
            for stage in ("sft", "grpo")
        }
    finally:
        os.chdir(ROOT)
        shutil.rmtree(directory, ignore_errors=True)
    print(json.dumps({"settings": vars(args) | {"seed": 0, "cpus": os.cpu_count()}, **results}, indent=2))


if __name__ == "__main__":
    main()
