"""One GRPO step at the real vocabulary: ours (GRPOTrainer.step) vs TRL's GRPOTrainer on a Qwen2-shaped model. JSON.

    PYTHONPATH=. python benchmarks/grpo_real.py           # about 5 minutes on a 2-core CPU
    PYTHONPATH=. python benchmarks/grpo_real.py --quick   # a smoke run (the family's tiny width, 2 steps)

The JSON also goes to results/grpo-real-benchmark.json (--out elsewhere; a --quick run writes no file).

benchmarks/grpo.py's comparison (its functions, imported) on another model: tests/families.py's `qwen2`
(the real Qwen tokenizer, the real padded 151,936-row vocabulary, 14 query / 2 key-value heads, qkv bias,
tied embeddings, random weights) built at Qwen2.5-0.5B's width (hidden 896, MLP 4,864) with 4 layers
(benchmarks/label.py's build_qwen2): 196M parameters, 136M of them the tied embedding / LM head, so the
vocabulary is most of every step's work. The same on both sides: the weights (one saved checkpoint, loaded
by each), the prompts (latentlab.tasks.arithmetic.all_problems, batches drawn as grpo.py draws them, the
same in the same order), the reward (ArithmeticReward with params.yaml's grpo.even_bonus), the batch (4
prompts x G = 8 completions of exactly 6 new tokens: random weights never draw an end-of-sequence, so
neither side stops early), temperature 1, one gradient step per batch, beta = 0 (no reference model),
float32, AdamW at grpo_full.lr with the same warm-up + cosine schedule (TRL is handed ours), one torch
thread, CPU. TRL's defaults that would make it other work are spelt out (grpo.run_trl): bf16=False,
gradient_checkpointing=False, loss_type="grpo" (not DAPO's), shuffle_dataset=False, use_vllm=False.
With random weights no completion starts with a number, so every reward and advantage is 0 and the loss
is 0; both sides still run the whole step (sampling, reward, forward, backward, clipping, AdamW).

Two measurements, each in a fresh process forked from a parent that has imported everything and computed
nothing (benchmarks/label.py's in_fresh_process):
  speed:  grpo.interleaved: TRL's training loop drives; after each of its steps one step of ours and one
          floor pass (forward + backward of the scored tokens, nothing else) run, so a slow spell of the
          shared machine hits all three alike. Seconds per step: the median after --warmup steps; the
          ratio TRL / ours of the medians (the goal: >= 1.5) and the median of the per-step ratios.
          Default: 6 steps, the first left out.
  memory: each side alone in its own process for --memory-steps steps: its peak RSS (ru_maxrss), and that
          peak over the process's RSS before the model was loaded (the same imports on both sides, trl
          included), i.e. what the model, optimizer state and step cost; the goal: ours <= TRL's, by the
          growth (absolute peaks are reported too). A single process running both sides could not say this:
          its peak is the larger side's, tracemalloc does not see torch's tensors, and glibc's kept heap
          blurs RSS deltas. Default: 2 steps (the peak is in the AdamW step, whose state is made in the
          first). Seconds per step alone, after the first, are reported too (not paired: context only).
Without trl installed the speed run times ours and the floor and says `"trl": "not installed"`, and the
memory run measures ours alone.
"""

import argparse
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import latentlab  # noqa: E402, F401  (first: the CPU kernels pinned before torch loads, as the stages pin them)

# isort: split
import torch  # noqa: E402

from benchmarks.grpo import interleaved, run_trl, timing_report  # noqa: E402
from benchmarks.label import (  # noqa: E402
    add_qwen2_arguments,
    build_qwen2,
    emit,
    in_fresh_process,
    qwen2_shape,
    rss_bytes,
)
from latentlab.lm.modeling import load_lm  # noqa: E402
from latentlab.policies.lm_policy import LMPolicy  # noqa: E402
from latentlab.rl.grpo import GRPOTrainer  # noqa: E402
from latentlab.tasks.arithmetic import ArithmeticConfig, all_problems, problem_batches  # noqa: E402
from latentlab.tasks.rewards import ArithmeticReward  # noqa: E402
from stages.params import load_params  # noqa: E402

RESULT = ROOT / "results" / "grpo-real-benchmark.json"


def trl_version() -> str | None:
    try:
        import trl
    except ImportError:
        return None
    return trl.__version__


def speed(model_dir: str, cfg, plan, reward, args) -> dict:
    """grpo.py's interleaved run (ours, TRL, floor) and its report, in this process."""
    torch.set_num_threads(1)
    trl_result, times, curves = interleaved(model_dir, cfg, plan, reward, args.seed, trl=not args.no_trl)
    return {"trl": trl_result, **timing_report(times, curves, args.warmup)}


def memory(side: str, model_dir: str, cfg, plan, reward, args) -> dict:
    """One side alone for len(plan) steps: peak RSS, its growth over the RSS before the model was loaded, and
    the seconds of each step."""
    torch.set_num_threads(1)
    before = rss_bytes()
    if side == "trl":
        times = {"trl": []}  # run_trl's callback times each of TRL's steps
        run_trl(model_dir, args.seed, cfg, plan, reward, lambda step: None, times, {"trl": []})
        seconds = times["trl"]
    else:
        model, tokenizer = load_lm(model_dir)
        ours = GRPOTrainer(LMPolicy(model, tokenizer), reward, cfg, torch.Generator().manual_seed(args.seed))
        seconds = []
        for step, batch in enumerate(plan):
            started = time.perf_counter()
            ours.step(step, *batch)
            seconds.append(time.perf_counter() - started)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {
        "peak_rss_mb": round(peak / 2**20, 1),
        "peak_over_start_mb": round((peak - before) / 2**20, 1),
        "start_rss_mb": round(before / 2**20, 1),
        "seconds_per_step": [round(s, 3) for s in seconds],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_qwen2_arguments(parser)
    parser.add_argument("--prompts", type=int, default=4, help="distinct prompts per step")
    parser.add_argument("--group-size", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=6)
    parser.add_argument("--steps", type=int, default=6, help="interleaved steps (timing repeats)")
    parser.add_argument("--warmup", type=int, default=1, help="first steps left out of the timings")
    parser.add_argument("--memory-steps", type=int, default=2, help="steps of each side alone, for its peak")
    parser.add_argument("--params", default=str(ROOT / "params.yaml"), help="grpo settings, lr and reward")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-trl", action="store_true", help="leave TRL out even when installed")
    parser.add_argument("--quick", action="store_true", help="a smoke run: the family's tiny width, 2 steps")
    parser.add_argument("--out", default=None, help=f"also write the JSON here (default: {RESULT}; --quick: none)")
    args = parser.parse_args()
    if args.quick:
        args.hidden, args.intermediate, args.layers, args.prompts, args.group_size = 56, 64, 2, 2, 2
        args.max_new_tokens, args.steps, args.warmup, args.memory_steps = 2, 2, 0, 1
    out = Path(args.out) if args.out else (None if args.quick else RESULT)
    torch.set_num_threads(1)
    os.environ.setdefault("LATENTLAB_THREADS", "1")
    version = trl_version()  # imported here, before any fork: each child would import it again
    import transformers.models.qwen2.modeling_qwen2  # noqa: F401  (lazy: each child would import it again)

    if version:
        import datasets  # noqa: F401

    params = load_params(args.params)
    settings = params.grpo.model_copy(
        update={
            "steps": args.steps,
            "prompts_per_step": args.prompts,
            "group_size": args.group_size,
            "max_new_tokens": args.max_new_tokens,
        }
    )
    cfg = settings.with_lr(params.grpo_full.lr)
    reward = ArithmeticReward(params.grpo.even_bonus)
    batches = problem_batches(all_problems(ArithmeticConfig()), args.prompts, torch.Generator().manual_seed(args.seed))
    plan = [next(batches) for _ in range(max(args.steps, args.memory_steps))]
    sides = ["ours"] + (["trl"] if version and not args.no_trl else [])

    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        print(f"building the Qwen2-shaped model (hidden {args.hidden}, {args.layers} layers)", file=sys.stderr)
        model_dir = in_fresh_process(build_qwen2, Path(tmp) / "qwen2", args.hidden, args.layers, args.intermediate)
        print(f"speed: {args.steps} interleaved steps ({', '.join(sides)}, floor)", file=sys.stderr, flush=True)
        timing = in_fresh_process(speed, model_dir, cfg, plan[: args.steps], reward, args)
        peaks = {}
        for side in sides:
            print(f"memory: {side} alone, {args.memory_steps} steps", file=sys.stderr, flush=True)
            peaks[side] = in_fresh_process(memory, side, model_dir, cfg, plan[: args.memory_steps], reward, args)
        model = qwen2_shape(model_dir)
    ours_s = timing["seconds_per_step"]["ours"]["median"]
    goals = {}
    if "trl" in timing["seconds_per_step"]:
        ratio = timing["seconds_per_step"]["trl"]["median"] / ours_s
        paired = timing["ratios"]["trl_over_ours_paired"]
        goals["trl_over_ours_seconds_per_step"] = {
            "goal": ">= 1.5",
            "value": round(ratio, 3),
            "paired_median": round(paired, 3),
            "goal_met": ratio >= 1.5,
        }
    if "trl" in peaks:
        ours_mb, trl_mb = peaks["ours"]["peak_over_start_mb"], peaks["trl"]["peak_over_start_mb"]
        goals["ours_peak_memory_vs_trl"] = {
            "goal": "ours <= trl (peak RSS over the process before loading the model)",
            "ours_mb": ours_mb,
            "trl_mb": trl_mb,
            "ours_over_trl": round(ours_mb / trl_mb, 3),
            "absolute_peak_rss_mb": {side: p["peak_rss_mb"] for side, p in peaks.items()},
            "goal_met": ours_mb <= trl_mb,
        }
    result = {
        "benchmark": "grpo_step_real_vocab",
        "settings": {
            "model": model,
            "prompts": "latentlab.tasks.arithmetic.all_problems(ArithmeticConfig())",
            "reward": f"ArithmeticReward(even_bonus={params.grpo.even_bonus})",
            "prompts_per_step": cfg.prompts_per_step,
            "group_size": cfg.group_size,
            "max_new_tokens": cfg.max_new_tokens,
            "temperature": cfg.temperature,
            "beta": cfg.beta,
            "lr": cfg.lr,
            "dtype": "float32",
            "steps": args.steps,
            "timed_steps": args.steps - args.warmup,
            "memory_steps": args.memory_steps,
            "seed": args.seed,
            "torch_threads": 1,
            "torch": torch.__version__,
            "trl_version": version,
            "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        },
        **timing,
        "memory": peaks,
        "goals": goals,
        "seconds_alone_median": {
            side: statistics.median(p["seconds_per_step"][1:] or p["seconds_per_step"]) for side, p in peaks.items()
        },
        "wall_s": round(time.perf_counter() - started, 1),
    }
    emit(result, out)


if __name__ == "__main__":
    main()
