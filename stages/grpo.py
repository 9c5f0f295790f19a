"""grpo: GRPO of the whole SFT model on the full set -> models/grpo.

Reward: closeness to y plus `even_bonus` for an even answer. The recipe (`stages/recipes.py`) is shared
with the `inject` stage: both read the `grpo` section and draw the same seeded prompts and sampling
stream, so the two differ only in the policy that trains and its learning rate (`grpo_full.lr` here).
With `model.adapter: lora` only LoRA adapters train and the frozen reference is the same model with them off;
models/grpo holds the merged model, models/grpo/adapter the adapter alone.
"""

import copy

from latentlab.common.inputs import require_model_dir
from latentlab.policies.adapter import AdapterDisabled
from latentlab.policies.lm_policy import LMPolicy
from stages.common import setup, stage
from stages.execution import load_trained_lm, save_fine_tuned_lm
from stages.paths import MODELS, PLOTS
from stages.recipes import train_with_grpo


@stage(torchrun=True)
def main(params):
    run = setup(params)
    sft = require_model_dir(MODELS / "sft")
    model, tokenizer = load_trained_lm(params, sft, run)
    policy = LMPolicy(model, tokenizer, params.prompt)
    if params.model.adapter == "lora":
        reference = AdapterDisabled(policy) if params.grpo.beta > 0 else None
    else:
        frozen = copy.deepcopy(model).requires_grad_(False)
        reference = LMPolicy(frozen, tokenizer, params.prompt) if params.grpo.beta > 0 else None
    log, learner = train_with_grpo(params, run, "grpo", "grpo_full", policy, reference)
    with learner.whole():  # fsdp: the whole weights gathered to rank 0 (every rank takes part)
        if not run.leader:  # under torchrun rank 0 alone writes the outputs
            return
        save_fine_tuned_lm(params, model, tokenizer, MODELS / "grpo", sft)
    log.save(PLOTS / "grpo.csv")  # and plots/grpo_speed.csv
    log.finish()


if __name__ == "__main__":
    main()
