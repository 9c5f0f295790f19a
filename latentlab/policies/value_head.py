"""A value head for PPO on any LM policy: V(s_t) from the policy model's last hidden state.

The state s_t of token t is the prefix and the tokens before t; its representation is the final
hidden state (after the model's last norm) at the position that predicts token t, the same position
whose logits give pi(token t). The head is a linear layer, zero-initialised (V = 0 at the start), on
a shared trunk: the value loss also trains the policy's model, weighted by PPO's vf_coef.
"""

import torch
from torch import nn

from latentlab.lm.capture import LayerCapture
from latentlab.policies.lm_policy import LMPolicy, Rollout


class ValueHead(nn.Module):
    def __init__(self, hidden_size: int):
        super().__init__()
        self.linear = nn.Linear(hidden_size, 1)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, states: torch.Tensor) -> torch.Tensor:
        return self.linear(states.float()).squeeze(-1)


def logprobs_and_values(
    policy: LMPolicy, head: ValueHead, rollout: Rollout, temperature: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """`(B, T)` log pi(token t) and V(s_t) of the rollout's completions, from one forward pass.

    The final norm's output is captured during the policy's own scoring pass; its last T + 1
    positions are the prefix's last position and the completion's, of which the first T predict
    completion tokens 0..T-1 (the last predicts nothing).
    """
    with LayerCapture(policy.model, [-1]) as capture:
        logprobs = policy.logprobs(rollout, temperature)
        states = capture.stacked()[:, :, 0]  # (B, P + T, H)
    length = logprobs.shape[1]
    values = head(states[:, -(length + 1) : -1])
    return logprobs, values * rollout.completions.mask
