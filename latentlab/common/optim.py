"""The optimizer every trainer uses, and the finite-loss guard: shared by supervised and RL training."""

import math
from collections.abc import Callable

import torch

from latentlab.common.errors import NonFiniteLossError
from latentlab.common.precision import MasterWeights


def check_finite(value: torch.Tensor, step: int, what: str = "loss") -> None:
    if not torch.isfinite(value).all():
        raise NonFiniteLossError(
            f"{what} is {value.item() if value.numel() == 1 else value} at step {step}: "
            "lower the learning rate or check the inputs"
        )


def lr_factor(steps: int, warmup_steps: int = 0) -> Callable[[int], float]:
    """The learning-rate factor of every trainer: linear warm-up, then cosine decay to 10%."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress_ = (step - warmup_steps) / max(1, steps - warmup_steps)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress_)))

    return factor


def build_optimizer(params, lr: float, steps: int, warmup_steps: int = 0, weight_decay: float = 0.0):
    """(optimizer, schedule): AdamW with linear warm-up then cosine decay to 10% of `lr`.

    bf16 parameters (`model.dtype: bfloat16`) are stepped through fp32 master copies (`MasterWeights`,
    latentlab/common/precision.py; bf16 rounds small updates away); with every parameter fp32 it is a plain AdamW.
    """
    params = list(params)
    if all(p.dtype == torch.float32 for p in params):
        optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
        return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(steps, warmup_steps))
    masters = MasterWeights.master_params(params)
    inner = torch.optim.AdamW(masters, lr=lr, weight_decay=weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(inner, lr_factor(steps, warmup_steps))
    return MasterWeights(params, masters, inner), schedule
