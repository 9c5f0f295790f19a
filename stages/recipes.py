"""Recipes shared by several stages (a stage never imports another stage).

`train_with_grpo`: GRPO on the arithmetic task. The `grpo` stage (the whole model) and `inject` (an
injector on the frozen model) read the same `grpo` section and draw the same seeded prompts and
sampling stream, so they differ only in the policy that trains and its learning rate.
"""

from latentlab.common.inputs import read_table
from latentlab.common.tracking import StepLog
from latentlab.policies.lm_policy import LMPolicy
from latentlab.rl.grpo import GRPOTrainer
from latentlab.tasks.arithmetic import PROBLEM_SCHEMA, problem_batches
from latentlab.tasks.evaluation import heldout_monitor
from latentlab.tasks.rewards import ArithmeticReward
from stages.common import SYNTH, Run, step_log
from stages.params import Params


def train_with_grpo(
    params: Params, run: Run, name: str, section: str, policy: LMPolicy, reference: LMPolicy | None
) -> StepLog:
    """GRPO on the full set with the `grpo` section's reward, sampler, groups and steps and the learning
    rate of the stage's own params `section`; `name` labels the progress bar and the W&B run."""
    cfg, lr = params.grpo, getattr(params, section).lr
    full = read_table(SYNTH / "full.parquet", PROBLEM_SCHEMA)
    test = read_table(SYNTH / "test.parquet", PROBLEM_SCHEMA)
    reward = ArithmeticReward(cfg.even_bonus)

    trainer = GRPOTrainer(policy, reward, cfg.with_lr(lr), run.sample_rng, reference)
    batches = problem_batches(full, cfg.prompts_per_step, run.data_rng)
    monitor = heldout_monitor(
        policy, test.sample(min(cfg.eval_batch, test.height), seed=params.seed), reward, params.evaluate.max_new_tokens
    )
    log = step_log(params, name, params.model_dump(include={"grpo", section, "seed"}))
    trainer.train(lambda: next(batches), log, name, monitor, cfg.eval_every)
    return log
