"""The frozen reference of a LoRA-trained policy: the same model with its adapters switched off.

KL-regularised RL (GRPO's beta > 0) scores each rollout under the policy it started from. With full fine-tuning
that is a frozen copy of the model; under LoRA the base weights never change, so the starting policy is the
trained model itself with its adapters disabled (peft's `disable_adapter()`: each LoRA layer returns its base
layer's output alone). No second copy of the weights, and the log-probs are bit for bit those of the base model.
"""

import torch

from latentlab.policies.lm_policy import LMPolicy, Rollout


class AdapterDisabled:
    """A reference policy: `logprobs` of `policy` (an LMPolicy, or a variant such as the NLA actor, whose model is a
    PeftModel) computed with the adapters off. Only `logprobs` is offered: a reference scores, it never samples.

    `policy` may be the trained policy itself, or one sharing its PeftModel with add-ons of its own (the NLA actor's
    reference keeps a frozen copy of the injector, which trains alongside the adapters)."""

    def __init__(self, policy: LMPolicy):
        self.policy = policy

    def logprobs(self, rollout: Rollout, temperature: float) -> torch.Tensor:
        with self.policy.model.disable_adapter():
            return self.policy.logprobs(rollout, temperature)
