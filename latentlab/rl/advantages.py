"""Advantage estimators shared by the RL algorithms."""

import torch


def group_advantages(rewards: torch.Tensor, group_size: int, scale: bool = True, eps: float = 1e-4) -> torch.Tensor:
    """A_i = (r_i - mean_g) / (std_g + eps) within consecutive groups of `group_size` rewards (GRPO).

    std is the unbiased sample std (as TRL); a group whose rewards are all equal gets A = 0.
    """
    if rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {group_size}")
    grouped = rewards.view(-1, group_size)
    advantages = grouped - grouped.mean(dim=1, keepdim=True)
    if scale:
        advantages = advantages / (grouped.std(dim=1, keepdim=True) + eps)
    return advantages.flatten()


def gae(
    rewards: torch.Tensor, values: torch.Tensor, dones: torch.Tensor, last_value: torch.Tensor, gamma: float, lam: float
) -> torch.Tensor:
    """Generalised advantage estimation (Schulman et al., 2016, "High-Dimensional Continuous Control
    Using Generalized Advantage Estimation", eq. 16), over time-major `(T, ...)` tensors:

        delta_t = r_t + gamma * V(s_{t+1}) * (1 - done_t) - V(s_t)
        A_t     = delta_t + gamma * lam * (1 - done_t) * A_{t+1}

    `done_t` marks that the episode ended with step t (nothing is bootstrapped across it); `last_value`
    is V of the state after the last step. The TD(lambda) return is R^lambda_t = A_t + V(s_t) (the
    target AWR regresses V on); lam = 1 gives the Monte-Carlo advantage, lam = 0 the one-step TD error.
    """
    if not rewards.shape == values.shape == dones.shape:
        raise ValueError(
            f"rewards {tuple(rewards.shape)}, values {tuple(values.shape)} and dones "
            f"{tuple(dones.shape)} must have the same shape"
        )
    not_done = 1.0 - dones.float()
    next_values = torch.cat([values[1:], last_value.reshape(1, *values.shape[1:]).to(values)])
    deltas = rewards + gamma * next_values * not_done - values
    advantages = torch.zeros_like(deltas)
    running = torch.zeros_like(deltas[0])
    for t in reversed(range(len(deltas))):  # A_t needs A_{t+1}: one backward sweep
        running = deltas[t] + gamma * lam * not_done[t] * running
        advantages[t] = running
    return advantages
