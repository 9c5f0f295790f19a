"""inject: GRPO of a hidden-state injector on the frozen SFT model -> models/inject.

Everything GRPO needs except the learning rate comes from the `grpo` section (reward, sampler,
prompts per step, group size, steps, warm-up, held-out monitor), and the run draws the same seeded
prompts and sampling stream, so `inject` and `grpo` are compared like for like. The `inject`
section sets only the injector's shape and input layer, its L2 pull toward identity and its lr.
"""

import copy

from latentlab.arithmetic import PROBLEM_SCHEMA, problem_batches
from latentlab.atomic import atomic_output
from latentlab.evaluation import heldout_monitor
from latentlab.grpo import GRPOTrainer
from latentlab.injection import InjectionPolicy, build_injector, save_injector
from latentlab.inputs import read_table, require_model_dir
from latentlab.modeling import load_lm, read_manifest
from latentlab.rewards import ArithmeticReward
from stages.common import MODELS, PLOTS, SYNTH, setup, stage, step_log


@stage
def main(params):
    run, shared, cfg = setup(params), params.grpo, params.inject
    sft = require_model_dir(MODELS / "sft")
    model, tokenizer = load_lm(sft, run.device)
    injector = build_injector(model, cfg.injector)
    policy = InjectionPolicy(model, tokenizer, injector, cfg.l2)
    # the KL reference is the policy at the start: the same frozen model with the identity injector
    reference = InjectionPolicy(model, tokenizer, copy.deepcopy(injector).requires_grad_(False)) if shared.beta > 0 else None
    full = read_table(SYNTH / "full.parquet", PROBLEM_SCHEMA)
    test = read_table(SYNTH / "test.parquet", PROBLEM_SCHEMA)
    reward = ArithmeticReward(shared.even_bonus)

    trainer = GRPOTrainer(policy, reward, shared.model_copy(update={"lr": cfg.lr}), run.sample_rng, reference)
    batches = problem_batches(full, shared.prompts_per_step, run.data_rng)
    monitor = heldout_monitor(policy, test.sample(min(shared.eval_batch, test.height), seed=params.seed),
                              reward, params.evaluate.max_new_tokens)
    log = step_log(params, "inject", params.model_dump(include={"grpo", "inject", "seed"}))
    trainer.train(lambda: next(batches), log, "inject", monitor, shared.eval_every)

    # the premise of the stage: the optimizer held only the injector and no gradient reached the base
    if any(p.requires_grad or p.grad is not None for p in model.parameters()):
        raise RuntimeError("the SFT model was not frozen: a base parameter is trainable or received a gradient")
    with atomic_output(MODELS / "inject") as out:
        save_injector(injector, out, base=sft, parent=read_manifest(sft).get("content_sha256"),
                      trained_parameters=sum(p.numel() for p in policy.trainable_parameters()))
    log.save(PLOTS / "inject.csv")  # and plots/inject_speed.csv (seconds_per_step, tokens_per_s)
    log.finish()


if __name__ == "__main__":
    main()
