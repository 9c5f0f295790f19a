"""Recipes shared by several stages (a stage never imports another stage).

`train_with_grpo`: GRPO on the arithmetic task. The `grpo` stage (the whole model) and `inject` (an
injector on the frozen model) read the same `grpo` section and draw the same seeded prompts and
sampling stream, so they differ only in the policy that trains and its learning rate.
"""

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import polars as pl
import torch

from latentlab.common.execution import Learner, Loop
from latentlab.common.inputs import read_table
from latentlab.common.tracking import StepLog
from latentlab.policies.lm_policy import LMPolicy
from latentlab.rl.grpo import GRPOTrainer
from latentlab.tasks.arithmetic import PROBLEM_SCHEMA, problem_batches
from latentlab.tasks.evaluation import heldout_monitor
from latentlab.tasks.rewards import ArithmeticReward
from stages.common import Run, require_divisible, step_log
from stages.execution import sampling
from stages.params import Params
from stages.paths import SYNTH


@dataclass
class ArithmeticGRPO:
    """The GRPO setup of the arithmetic task: trainer, seeded prompt stream, reward and held-out batch."""

    trainer: GRPOTrainer
    batches: Iterator[tuple[list[str], list]]
    reward: ArithmeticReward
    full: pl.DataFrame  # the training problems
    heldout: pl.DataFrame  # the fixed held-out batch of the monitor (from the test set)
    max_new_tokens: int

    def monitor(self, policy: LMPolicy):
        return heldout_monitor(policy, self.heldout, self.reward, self.max_new_tokens)

    def stream(self, batch_size: int, seed: int, answers: bool = False) -> Callable[[], tuple[list[str], list]]:
        """A fresh endless stream of training batches seeded by `seed`: (prompts, y) or (prompts, answer texts)."""
        batches = problem_batches(self.full, batch_size, torch.Generator().manual_seed(seed))
        if not answers:
            return lambda: next(batches)

        def next_probe() -> tuple[list[str], list[str]]:
            prompts, ys = next(batches)
            return prompts, [str(y) for y in ys]

        return next_probe


def arithmetic_grpo(
    params: Params, run: Run, lr: float, policy: LMPolicy, reference: LMPolicy | None, steps: int | None = None
) -> ArithmeticGRPO:
    """GRPO on the full set with the `grpo` section's reward, sampler and groups, learning rate `lr` and
    `steps` (null: grpo.steps; it sets the length of the learning-rate schedule)."""
    cfg = params.grpo
    settings = cfg if steps is None else cfg.model_copy(update={"steps": steps})
    full = read_table(SYNTH / "full.parquet", PROBLEM_SCHEMA)
    test = read_table(SYNTH / "test.parquet", PROBLEM_SCHEMA)
    reward = ArithmeticReward(cfg.even_bonus)
    require_divisible(run, cfg.prompts_per_step, "grpo.prompts_per_step")
    trainer = GRPOTrainer(
        policy, reward, settings.with_lr(lr), run.sample_rngs, reference=reference, execution=sampling(run, params)
    )
    batches = problem_batches(full, cfg.prompts_per_step, run.data_rng)
    heldout = test.sample(min(cfg.eval_batch, test.height), seed=params.seed)
    return ArithmeticGRPO(trainer, batches, reward, full, heldout, params.evaluate.max_new_tokens)


def train_with_grpo(
    params: Params, run: Run, name: str, section: str, policy: LMPolicy, reference: LMPolicy | None
) -> tuple[StepLog, Learner]:
    """GRPO on the full set with the `grpo` section's reward, sampler, groups and steps and the learning
    rate of the stage's own params `section`; `name` labels the progress bar and the W&B run. Returns the log and
    the trainer's learner (its `whole()` gathers a sharded policy to be saved)."""
    grpo = arithmetic_grpo(params, run, getattr(params, section).lr, policy, reference)
    log = step_log(params, name, params.model_dump(include={"grpo", section, "seed"}))
    loop = Loop(log=log, desc=name, evaluate=grpo.monitor(policy), eval_every=params.grpo.eval_every)
    grpo.trainer.train(lambda: next(grpo.batches), loop)
    return log, grpo.trainer.learner
