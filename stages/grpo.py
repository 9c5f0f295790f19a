"""grpo: GRPO of the whole SFT model on the full set -> models/grpo.

Reward: closeness to y plus `even_bonus` for an even answer. `train_with_grpo` is the recipe, shared
with the `inject` stage: both read the `grpo` section and draw the same seeded prompts and sampling
stream, so the two differ only in the policy that trains (and its learning rate).
"""

import copy

from latentlab.arithmetic import PROBLEM_SCHEMA, problem_batches
from latentlab.atomic import atomic_output
from latentlab.evaluation import heldout_monitor
from latentlab.grpo import GRPOTrainer
from latentlab.inputs import read_table, require_model_dir
from latentlab.modeling import load_lm, read_manifest, save_lm
from latentlab.policy import LMPolicy
from latentlab.rewards import ArithmeticReward
from latentlab.tracking import StepLog
from stages.common import MODELS, PLOTS, SYNTH, Run, setup, stage, step_log
from stages.params import Params


def train_with_grpo(params: Params, run: Run, name: str, policy: LMPolicy, reference: LMPolicy | None,
                    lr: float) -> StepLog:
    """GRPO on the full set with the `grpo` section's reward, sampler, groups and steps; returns the log."""
    cfg = params.grpo
    full = read_table(SYNTH / "full.parquet", PROBLEM_SCHEMA)
    test = read_table(SYNTH / "test.parquet", PROBLEM_SCHEMA)
    reward = ArithmeticReward(cfg.even_bonus)

    trainer = GRPOTrainer(policy, reward, cfg.model_copy(update={"lr": lr}), run.sample_rng, reference)
    batches = problem_batches(full, cfg.prompts_per_step, run.data_rng)
    monitor = heldout_monitor(policy, test.sample(min(cfg.eval_batch, test.height), seed=params.seed),
                              reward, params.evaluate.max_new_tokens)
    log = step_log(params, name, params.model_dump(include={"grpo", name, "seed"}))
    trainer.train(lambda: next(batches), log, name, monitor, cfg.eval_every)
    return log


@stage
def main(params):
    run = setup(params)
    sft = require_model_dir(MODELS / "sft")
    model, tokenizer = load_lm(sft, run.device)
    policy = LMPolicy(model, tokenizer)
    reference = LMPolicy(copy.deepcopy(model).requires_grad_(False), tokenizer) if params.grpo.beta > 0 else None
    log = train_with_grpo(params, run, "grpo", policy, reference, params.grpo.lr)

    with atomic_output(MODELS / "grpo") as out:
        save_lm(model, tokenizer, out, parent=read_manifest(sft).get("content_sha256"),
                trained_parameters=sum(p.numel() for p in policy.trainable_parameters()))
    log.save(PLOTS / "grpo.csv")  # and plots/grpo_speed.csv
    log.finish()


if __name__ == "__main__":
    main()
