"""grpo: GRPO of the whole SFT model on the full set -> models/grpo.

Reward: closeness to y plus `even_bonus` for an even answer. The `inject` stage reads this same
params section, so both train on the same reward, sampler, prompts, group size and steps.
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
from stages.common import MODELS, PLOTS, SYNTH, setup, stage, step_log


@stage
def main(params):
    run, cfg = setup(params), params.grpo
    sft = require_model_dir(MODELS / "sft")
    model, tokenizer = load_lm(sft, run.device)
    policy = LMPolicy(model, tokenizer)
    reference = LMPolicy(copy.deepcopy(model).requires_grad_(False), tokenizer) if cfg.beta > 0 else None
    full = read_table(SYNTH / "full.parquet", PROBLEM_SCHEMA)
    test = read_table(SYNTH / "test.parquet", PROBLEM_SCHEMA)
    reward = ArithmeticReward(cfg.even_bonus)

    trainer = GRPOTrainer(policy, reward, cfg, run.sample_rng, reference)
    batches = problem_batches(full, cfg.prompts_per_step, run.data_rng)
    monitor = heldout_monitor(policy, test.sample(min(cfg.eval_batch, test.height), seed=params.seed),
                              reward, params.evaluate.max_new_tokens)
    log = step_log(params, "grpo", params.model_dump(include={"grpo", "seed"}))
    trainer.train(lambda: next(batches), log, "grpo", monitor, cfg.eval_every)

    with atomic_output(MODELS / "grpo") as out:
        save_lm(model, tokenizer, out, parent=read_manifest(sft).get("content_sha256"),
                trained_parameters=sum(p.numel() for p in policy.trainable_parameters()))
    log.save(PLOTS / "grpo.csv")  # and plots/grpo_speed.csv
    log.finish()


if __name__ == "__main__":
    main()
