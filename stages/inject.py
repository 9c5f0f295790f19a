"""inject: GRPO of a hidden-state injector on the frozen SFT model -> models/inject.

The same recipe as the `grpo` stage (`stages/recipes.py`: reward, sampler, prompts per step, group
size, steps, warm-up, held-out monitor, seeded prompt and sampling streams), so `inject` and `grpo`
are compared like for like. The `inject` section sets only the injector's shape and input layer,
its L2 pull toward identity and its learning rate.
"""

import copy

from latentlab.common.atomic import atomic_output
from latentlab.common.inputs import require_model_dir
from latentlab.lm.modeling import load_lm, read_manifest
from latentlab.policies.injection import InjectionPolicy, build_injector, save_injector
from stages.common import MODELS, PLOTS, setup, stage
from stages.recipes import train_with_grpo


@stage(torchrun=True)
def main(params):
    run, cfg = setup(params), params.inject
    sft = require_model_dir(MODELS / "sft")
    model, tokenizer = load_lm(sft, run.device)
    injector = build_injector(model, cfg.injector)
    policy = InjectionPolicy(model, tokenizer, injector, cfg.l2)
    # the KL reference is the policy at the start: the same frozen model with the identity injector
    reference = (
        InjectionPolicy(model, tokenizer, copy.deepcopy(injector).requires_grad_(False))
        if params.grpo.beta > 0
        else None
    )
    log = train_with_grpo(params, run, "inject", "inject", policy, reference)
    if not run.leader:  # under torchrun rank 0 alone writes the outputs
        return

    # the premise of the stage: the optimizer held only the injector and no gradient reached the base
    if any(p.requires_grad or p.grad is not None for p in model.parameters()):
        raise RuntimeError("the SFT model was not frozen: a base parameter is trainable or received a gradient")
    with atomic_output(MODELS / "inject") as out:
        save_injector(
            injector,
            out,
            base=sft,
            parent=read_manifest(sft).get("content_sha256"),
            trained_parameters=sum(p.numel() for p in policy.trainable_parameters()),
        )
    log.save(PLOTS / "inject.csv")  # and plots/inject_speed.csv (seconds_per_step, tokens_per_s)
    log.finish()


if __name__ == "__main__":
    main()
