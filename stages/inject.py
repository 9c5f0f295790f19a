"""inject: GRPO of a hidden-state injector on the frozen SFT model -> models/inject.

The same recipe as the `grpo` stage (`stages/recipes.py`: reward, sampler, prompts per step, group
size, steps, warm-up, held-out monitor, seeded prompt and sampling streams), so `inject` and `grpo`
are compared like for like. The `inject` section sets the injector's variant, shape and input layer,
its L2 pull toward its start, its learning rate and an optional alignment phase before GRPO.

-> metrics/inject.json: the variant; accuracy (overall / odd / even) on the whole test set of the frozen SFT
   model alone, of the injected model at step 0, after alignment when there is one, and after GRPO; trained
   parameters, the alignment's final KL; plots/inject_align.csv (the alignment's KL per step; a header only without
   it); plots/inject_speed.csv (seconds per GRPO step);
   plots/inject_scales.csv (step-0 accuracy of the norm variant over a sweep of norms).
"""

import copy

import torch

from latentlab.common.atomic import atomic_output
from latentlab.common.inputs import read_table, require_model_dir
from latentlab.common.tracking import StepLog
from latentlab.lm.modeling import read_manifest
from latentlab.policies.alignment import align_injector
from latentlab.policies.injection import InjectionPolicy, build_injector, save_injector
from latentlab.policies.lm_policy import LMPolicy
from latentlab.tasks.arithmetic import PROBLEM_SCHEMA, problem_batches
from latentlab.tasks.injection_eval import accuracy, norm_sweep
from latentlab.tasks.rewards import ArithmeticReward
from stages.common import check_layers, setup, stage, write_json
from stages.execution import load_trained_lm
from stages.paths import METRICS, MODELS, PLOTS, SYNTH
from stages.recipes import train_with_grpo


@stage(torchrun=True)
def main(params):
    run, cfg = setup(params), params.inject
    sft = require_model_dir(MODELS / "sft")
    check_layers(params, sft, ("inject.layer", "inject.gate_layer"))
    model, tokenizer = load_trained_lm(params, sft, run, adapters=False)
    full, test = read_table(SYNTH / "full.parquet", PROBLEM_SCHEMA), read_table(SYNTH / "test.parquet", PROBLEM_SCHEMA)
    reward, batch, tokens = (
        ArithmeticReward(params.grpo.even_bonus),
        params.evaluate.batch_size,
        params.evaluate.max_new_tokens,
    )
    # greedy decoding draws no random numbers: the GRPO run below is the one it would be without these
    # measurements. The frozen SFT model alone is what every variant reads and must beat.
    sft_policy = LMPolicy(model, tokenizer, params.prompt)
    metrics = {"variant": cfg.variant, "sft": accuracy(sft_policy, test, reward, batch, tokens, "sft")}
    injector = build_injector(model, cfg.injector, tokenizer)
    policy = InjectionPolicy(model, tokenizer, injector, cfg.l2, params.prompt)
    metrics["step0"] = accuracy(policy, test, reward, batch, tokens, "step 0")

    align_log = StepLog()
    if cfg.align_steps:  # its own seeded problem stream: GRPO's prompts and samples stay those of no alignment
        problems = problem_batches(full, cfg.align_batch, torch.Generator().manual_seed(params.seed + 3))
        answers = ((prompts, [str(y) for y in ys]) for prompts, ys in problems)  # gold answers as text
        metrics |= align_injector(
            policy, answers.__next__, cfg.align_steps, cfg.align_lr, params.grpo.max_grad_norm, align_log
        )
        metrics["after_align"] = accuracy(policy, test, reward, batch, tokens, "after alignment")

    # the KL reference is the policy at the start of GRPO: the same frozen model with the injector as it is now
    reference = (
        InjectionPolicy(model, tokenizer, copy.deepcopy(injector).requires_grad_(False), prompt_format=params.prompt)
        if params.grpo.beta > 0
        else None
    )
    log, learner = train_with_grpo(params, run, "inject", "inject", policy, reference)
    # the premise of the stage: the optimizer held only the injector and no gradient reached the base
    if any(p.requires_grad or p.grad is not None for p in model.parameters()):
        raise RuntimeError("the SFT model was not frozen: a base parameter is trainable or received a gradient")
    trained = sum(p.numel() for p in policy.trainable_parameters())
    with learner.scoring():  # every rank alike (fsdp: a sharded injector's forward takes every rank); = evaluate's
        metrics["final"] = accuracy(policy, test, reward, batch, tokens, "after GRPO")
    with learner.whole():  # fsdp: the whole injector gathered to rank 0 (every rank takes part)
        if not run.leader:  # under torchrun rank 0 alone writes the outputs
            return
        with atomic_output(MODELS / "inject") as out:
            save_injector(
                injector, out, base=sft, parent=read_manifest(sft).get("content_sha256"), trained_parameters=trained
            )
    log.save(PLOTS / "inject.csv")  # and plots/inject_speed.csv (seconds_per_step, tokens_per_s)
    log.finish()
    if align_log.rows:
        align_log.save(PLOTS / "inject_align.csv")
    else:  # no alignment: the columns alone, so the declared plot stays valid
        with atomic_output(PLOTS / "inject_align.csv") as partial:
            partial.write_text("step,kl,grad_norm,lr\n")

    # (seconds per step differ every run: they stay in plots/inject_speed.csv, out of this hashed output)
    metrics |= {"trained_parameters": trained}
    write_json(METRICS / "inject.json", metrics)
    # after training and saving: building the sweep's injectors draws random numbers
    prompts = full["prompt"].to_list()[:512]
    sweep = norm_sweep(
        model, tokenizer, cfg.injector, prompts, test, reward, batch, tokens, cfg.scale_sweep, params.prompt
    )
    with atomic_output(PLOTS / "inject_scales.csv") as partial:
        sweep.write_csv(partial)


if __name__ == "__main__":
    main()
