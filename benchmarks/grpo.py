"""One GRPO step: ours (latentlab.rl.grpo.GRPOTrainer.step) vs TRL's GRPOTrainer vs the compute floor. Prints JSON.

The same work on every side: the SFT model of the default DAG (models/sft), the training problems
(data/synth/full.parquet) in the same order, ArithmeticReward(even_bonus=0.1), 16 prompts x G=8
completions of at most 6 new tokens, temperature 1, one gradient step per batch, beta = 0, AdamW with
the grpo stage's learning rate and the same warm-up + cosine schedule, one torch thread, CPU.

  ours:  GRPOTrainer.step with the params.yaml `grpo` settings and `grpo_full.lr` (steps: --steps, the
         length of the learning-rate schedule);
  trl:   trl.GRPOTrainer (trl 1.16, the optional `bench` extra) with the settings above spelt out
         (its defaults differ: bf16 and gradient checkpointing are on, the loss is DAPO's), timed from
         its training loop (on_step_begin .. on_step_end: generation, reward, loss, backward, optimizer);
  floor: one forward + backward of the step's scored tokens and nothing else: the same 128 sequences
         (prompt + completion, as sampled by ours at that step), log-probs of the completion tokens.

Interleaving: TRL's training loop drives the run; at the end of each of its steps one step of ours and
one floor pass run, so a slow spell of the shared machine hits all three alike. Without trl installed
the loop runs ours and the floor only and says `"trl": "not installed"`. The first --warmup steps are
left out of the timings (not of the reward curves). Reward curves: the mean reward of each step's
128 completions, the same seed on both sides (their samplers draw differently, so the curves agree in
distribution, not token for token).
"""

import argparse
import contextlib
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import latentlab  # noqa: F401  (first: the CPU kernels pinned before torch loads, as the stages pin them)

# isort: split
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from latentlab.common.inputs import read_table  # noqa: E402
from latentlab.common.optim import build_optimizer  # noqa: E402
from latentlab.lm.modeling import load_lm  # noqa: E402
from latentlab.lm.sampling import positions_from_mask  # noqa: E402
from latentlab.policies.lm_policy import LMPolicy, Rollout  # noqa: E402
from latentlab.rl.grpo import GRPOTrainer  # noqa: E402
from latentlab.tasks.arithmetic import PROBLEM_SCHEMA, problem_batches  # noqa: E402
from latentlab.tasks.rewards import ArithmeticReward  # noqa: E402
from stages.params import load_params  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def summary(seconds: list[float]) -> dict:
    q1, median, q3 = statistics.quantiles(seconds, n=4, method="inclusive")
    return {"median": median, "q1": q1, "q3": q3, "iqr": q3 - q1, "n": len(seconds)}


def floor_pass(model, rollout: Rollout) -> None:
    """Forward + backward of the rollout's 128 prompt + completion sequences, loss on the completion tokens."""
    c = rollout.completions
    ids = torch.cat([rollout.prompt_ids, c.ids], dim=1)
    mask = torch.cat([rollout.prompt_mask, c.mask.long()], dim=1)
    length = c.ids.shape[1]
    logits = model(
        input_ids=ids, attention_mask=mask, position_ids=positions_from_mask(mask), logits_to_keep=length + 1
    ).logits[:, :-1]
    logprobs = torch.log_softmax(logits, -1).gather(-1, c.ids[..., None]).squeeze(-1)
    (-(logprobs * c.mask).sum() / c.mask.sum()).backward()
    model.zero_grad(set_to_none=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=str(ROOT / "models/sft"), help="the SFT model directory")
    parser.add_argument("--data", default=str(ROOT / "data/synth/full.parquet"), help="the training problems")
    parser.add_argument("--params", default=str(ROOT / "params.yaml"))
    parser.add_argument("--steps", type=int, default=30, help="steps (reward curves; timing repeats)")
    parser.add_argument("--warmup", type=int, default=3, help="first steps left out of the timings")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-trl", action="store_true", help="leave TRL out even when installed")
    args = parser.parse_args()
    torch.set_num_threads(1)
    os.environ.setdefault("LATENTLAB_THREADS", "1")
    missing = [path for path in (args.model, args.data) if not Path(path).exists()]
    if missing:  # a fresh clone: the DAG has not made them yet
        print(json.dumps({"benchmark": "grpo_step", "skipped": f"{missing} missing: run `dvc repro sft`"}))
        return

    params = load_params(args.params)
    settings = params.grpo.model_copy(update={"steps": args.steps})
    cfg = settings.with_lr(params.grpo_full.lr)
    reward = ArithmeticReward(params.grpo.even_bonus)
    P, G = cfg.prompts_per_step, cfg.group_size
    problems = read_table(args.data, PROBLEM_SCHEMA)
    batches = problem_batches(problems, P, torch.Generator().manual_seed(args.seed))
    plan = [next(batches) for _ in range(args.steps)]  # the prompts of every step, the same for ours and TRL

    trl_result, times, curves = interleaved(args.model, cfg, plan, reward, args.seed, trl=not args.no_trl)
    result = {
        "benchmark": "grpo_step",
        "settings": {
            "model": args.model,
            "prompts_per_step": P,
            "group_size": G,
            "max_new_tokens": cfg.max_new_tokens,
            "lr": cfg.lr,
            "steps": args.steps,
            "timed_steps": args.steps - args.warmup,
            "seed": args.seed,
            "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        },
        "trl": trl_result,
        **timing_report(times, curves, args.warmup),
    }
    print(json.dumps(result, indent=2))


def interleaved(model_dir, cfg, plan, reward, seed: int, trl: bool = True) -> tuple[str | dict, dict, dict]:
    """Ours, TRL (when installed and `trl`) and the floor on the model in `model_dir`, one step each per batch of
    `plan` (len(plan) steps), interleaved: (TRL's settings or why it was left out, seconds per step of each side,
    mean reward per step of ours and TRL)."""
    G = cfg.group_size
    model, tokenizer = load_lm(model_dir)
    ours = GRPOTrainer(LMPolicy(model, tokenizer), reward, cfg, torch.Generator().manual_seed(seed))
    floor_model, _ = load_lm(model_dir)
    floor_model.train()
    times = {"ours": [], "trl": [], "floor": []}
    curves = {"ours": [], "trl": []}

    def ours_and_floor(step: int) -> None:
        rows = []
        started = time.perf_counter()
        rows.append(ours.step(step, *plan[step]))
        times["ours"].append(time.perf_counter() - started)
        curves["ours"].append(rows[0]["reward_mean"])
        # the floor scores the sequences ours has just sampled (a fresh, unshared rollout of the same prompts)
        rollout = ours.policy.rollout([p for p in plan[step][0] for _ in range(G)], cfg.sampling, torch.Generator())
        started = time.perf_counter()
        floor_pass(floor_model, rollout)
        times["floor"].append(time.perf_counter() - started)

    try:
        import trl as installed
    except ImportError:
        installed = None
    if installed is None or not trl:
        for step in range(len(plan)):
            ours_and_floor(step)
        return ("not installed" if installed is None else "skipped (--no-trl)"), times, curves
    return run_trl(model_dir, seed, cfg, plan, reward, ours_and_floor, times, curves), times, curves


def timing_report(times: dict, curves: dict, warmup: int) -> dict:
    """Seconds per step of each side after `warmup` steps, their ratios and the reward curves, as JSON."""
    timed = {name: values[warmup:] for name, values in times.items() if values}
    result = {"seconds_per_step": {name: summary(values) for name, values in timed.items()}}
    med = {name: s["median"] for name, s in result["seconds_per_step"].items()}
    ratios = {"ours_over_floor": med["ours"] / med["floor"]}
    # per-step pairs share the same moment of the machine: their median ratio is the less noisy one
    ratios["ours_over_floor_paired"] = statistics.median(o / f for o, f in zip(timed["ours"], timed["floor"]))
    if "trl" in med:
        ratios["trl_over_ours"] = med["trl"] / med["ours"]
        ratios["trl_over_ours_paired"] = statistics.median(t / o for t, o in zip(timed["trl"], timed["ours"]))
    result["ratios"] = ratios
    result["reward_curves"] = {name: [round(r, 4) for r in values] for name, values in curves.items() if values}
    result["reward_mean_last_10"] = {
        name: statistics.fmean(values[-10:]) for name, values in result["reward_curves"].items()
    }
    return result


def run_trl(model_dir, seed: int, cfg, plan, reward, ours_and_floor, times, curves) -> dict:
    """TRL's GRPOTrainer on the same prompts, in the same order (len(plan) steps); `ours_and_floor(step)` after each
    of its steps (one step of ours and one floor pass)."""
    import datasets
    import trl
    from transformers import TrainerCallback

    G = cfg.group_size
    # the prompts of every step, in order; shuffle_dataset=False makes TRL's sampler walk them as given
    rows = [(p, y) for prompts, ys in plan for p, y in zip(prompts, ys)]
    dataset = datasets.Dataset.from_dict({"prompt": [p for p, _ in rows], "y": [y for _, y in rows]})

    def arithmetic_reward(prompts, completions, y, **kwargs):
        rewards = reward(completions, y)
        curves["trl"].append(statistics.fmean(rewards))
        return rewards

    class Interleave(TrainerCallback):
        def on_step_begin(self, targs, state, control, **kwargs):
            self.started = time.perf_counter()

        def on_step_end(self, targs, state, control, **kwargs):
            times["trl"].append(time.perf_counter() - self.started)
            ours_and_floor(state.global_step - 1)

    model, tokenizer = load_lm(model_dir)
    # the same optimizer and schedule as ours (AdamW, linear warm-up, cosine to 10%), built the same way
    optimizer, schedule = build_optimizer(model.parameters(), cfg.lr, cfg.steps, cfg.warmup_steps)
    config = trl.GRPOConfig(
        output_dir="/tmp/latentlab-bench-trl",
        use_cpu=True,
        bf16=False,
        fp16=False,
        gradient_checkpointing=False,
        use_vllm=False,
        seed=seed,
        max_steps=len(plan),
        per_device_train_batch_size=cfg.prompts_per_step * G,  # completions per step
        gradient_accumulation_steps=1,
        steps_per_generation=1,
        num_iterations=cfg.iterations,
        num_generations=G,
        max_completion_length=cfg.max_new_tokens,
        temperature=cfg.temperature,
        top_p=cfg.top_p,
        beta=cfg.beta,
        epsilon=cfg.clip_eps,
        scale_rewards="group" if cfg.scale_rewards else "none",
        loss_type="grpo" if cfg.loss_aggregation == "sequence" else "bnpo",
        max_grad_norm=cfg.max_grad_norm,
        learning_rate=cfg.lr,
        shuffle_dataset=False,
        dataloader_num_workers=0,
        eval_strategy="no",
        save_strategy="no",
        logging_strategy="no",
        report_to="none",
        disable_tqdm=True,
        log_completions=False,
    )
    trainer = trl.GRPOTrainer(
        model=model,
        reward_funcs=arithmetic_reward,
        args=config,
        train_dataset=dataset,
        processing_class=tokenizer,
        callbacks=[Interleave()],
        optimizers=(optimizer, schedule),
    )
    with contextlib.redirect_stdout(sys.stderr):  # the Trainer prints its summary: stdout is the JSON's
        trainer.train()
    return {"version": trl.__version__, "loss_type": config.loss_type, "bf16": False, "gradient_checkpointing": False}


if __name__ == "__main__":
    main()
