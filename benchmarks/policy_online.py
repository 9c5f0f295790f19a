"""Online speed of the hidden-state policy: env steps/s with live extraction, prompt-only (tokens 1)
vs generate-N (tokens N), in process vs through `latentlab serve` on 127.0.0.1; obs-only as the
floor. Prints JSON. Needs models/base and models/policy (dvc repro policy).

    LATENTLAB_THREADS=1 python benchmarks/policy_online.py --envs 16 --episodes 64 --tokens 1 8
"""

import argparse
import json
import subprocess
import sys
import time

import latentlab  # noqa: F401  (first: the CPU kernels pinned before torch loads, as the stages pin them)

# isort: split
import torch

from latentlab.common.runtime import seed_everything
from latentlab.hidden.client import HiddenClient
from latentlab.policies.actor_critic import load_policy
from latentlab.tasks.grid import GridConfig
from latentlab.tasks.grid_online import OnlineConfig, PolicyAgent, make_encoder, rollout


def start_server(model: str, tokens: int, layer: int, max_batch: int) -> tuple[subprocess.Popen, str]:
    command = [sys.executable, "-m", "latentlab.hidden.serve", "--model", model, "--port", "0", "--device", "cpu"]
    command += ["--layers", str(layer), "--tokens", str(tokens), "--max-batch", str(max_batch), "--batch-wait-ms", "0"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    line = process.stdout.readline()
    if "listening on" not in line:
        raise RuntimeError(f"server did not start: {line!r}")
    return process, line.split("listening on ")[1].split(" ")[0]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--envs", type=int, default=16)
    parser.add_argument("--episodes", type=int, default=64)
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--layer", type=int, default=-1)
    parser.add_argument("--skip-n", type=int, default=1)
    args = parser.parse_args()
    seed_everything(0)
    grid, hidden, obs = GridConfig(), load_policy("models/policy/hidden"), load_policy("models/policy/obs")
    labelled = {"temperature": 1.0, "top_p": 1.0, "dtype": "float32"}
    results = {"envs": args.envs, "episodes": args.episodes, "skip_n": args.skip_n, "threads": torch.get_num_threads()}

    def speed(policy, encoder, cfg) -> float:
        started = time.perf_counter()
        agent_for = lambda envs: PolicyAgent(policy, args.envs, encoder, cfg, 0)  # noqa: E731
        episodes = rollout(grid, agent_for, cfg, seed=10_000, desc="bench")
        return round(episodes.env_steps / (time.perf_counter() - started), 1)

    base = OnlineConfig(envs=args.envs, episodes=args.episodes, layer=args.layer, skip_n=args.skip_n)
    results["obs_only"] = speed(obs, None, base)
    for tokens in args.tokens:
        cfg = base.model_copy(update={"tokens": tokens})
        encoder = make_encoder(cfg, "models/base", {**labelled, "tokens": tokens}, torch.device("cpu"), 0)
        results[f"local_tokens_{tokens}"] = speed(hidden, encoder, cfg)
        process, url = start_server("models/base", tokens, args.layer, args.envs)
        try:
            client = HiddenClient(url, args.layer)
            results[f"server_tokens_{tokens}"] = speed(hidden, client, cfg)
            client.close()
        finally:
            process.terminate()
            process.wait(timeout=10)
    print(json.dumps({"env_steps_per_s": results}, indent=2))


if __name__ == "__main__":
    main()
