"""Seeding and device selection: the two things every stage does first."""

import os
import random

import numpy as np
import torch


def seed_everything(seed: int) -> torch.Generator:
    """Seed python, numpy and torch; return a torch generator for explicit sampling streams.

    Same seed + same machine (same thread count) gives the same outputs: CPU kernels are
    deterministic for a fixed number of threads, so we pin that too.
    """
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    threads = int(os.environ.get("LATENTLAB_THREADS", "0")) or torch.get_num_threads()
    torch.set_num_threads(threads)
    return torch.Generator().manual_seed(seed)


def resolve_device(name: str) -> torch.device:
    """'auto' picks the GPU when there is one; anything else is passed to torch as is."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {name!r} was asked for but torch sees no CUDA device")
    return device
