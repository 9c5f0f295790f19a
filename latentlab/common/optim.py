"""The optimizer every trainer uses, and the finite-loss guard: shared by supervised and RL training."""

import math

import torch

from latentlab.common.errors import NonFiniteLossError


def check_finite(value: torch.Tensor, step: int, what: str = "loss") -> None:
    if not torch.isfinite(value).all():
        raise NonFiniteLossError(
            f"{what} is {value.item() if value.numel() == 1 else value} at step {step}: "
            "lower the learning rate or check the inputs"
        )


def build_optimizer(params, lr: float, steps: int, warmup_steps: int = 0, weight_decay: float = 0.0):
    """AdamW with linear warm-up then cosine decay to 10% of `lr`."""
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress_ = (step - warmup_steps) / max(1, steps - warmup_steps)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress_)))

    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
