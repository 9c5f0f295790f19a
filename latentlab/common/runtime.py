"""Seeding and device selection: the two things every stage does first."""

import contextlib
import os
import random

import numpy as np
import torch


def seed_everything(seed: int, threads: int | None = None) -> torch.Generator:
    """Seed python, numpy and torch; return a torch generator for explicit sampling streams.

    Same seed + same thread count gives the same outputs: CPU kernels are deterministic for a fixed
    number of threads, so we pin that too: `threads` (the stages' `threads` param), else the
    LATENTLAB_THREADS environment variable (the CLI, benchmarks), else every core torch sees (0 too).
    """
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if threads is None:
        threads = int(os.environ.get("LATENTLAB_THREADS", "0"))
    threads = threads or torch.get_num_threads()
    torch.set_num_threads(threads)
    return torch.Generator().manual_seed(seed)


def resolve_device(name: str) -> torch.device:
    """'auto' picks the GPU when there is one; anything else must name a device this machine has: a ValueError
    says which and why (a CUDA device torch cannot see, an index past the GPUs, a name torch does not know)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"{name!r} is not a device torch knows: use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            build = "" if torch.version.cuda else f"; this torch ({torch.__version__}) is built without CUDA"
            raise ValueError(f"{name!r} was asked for but torch sees no CUDA device{build}: use device: auto or cpu")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            seen = ", ".join(f"cuda:{i}" for i in range(count))
            raise ValueError(f"{name!r} was asked for but torch sees {count} CUDA device{'s' * (count > 1)} ({seen})")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"{name!r} was asked for but torch sees no MPS device: use device: auto or cpu")
    return device


def to_device(tensor: torch.Tensor, device) -> torch.Tensor:
    """`tensor` on `device`; a CPU -> CUDA copy goes through pinned memory and does not block the host
    (the copy is ordered on the current stream, before any kernel that reads it). On the CPU: `.to` as ever."""
    device = torch.device(device)
    if device.type == "cuda" and tensor.device.type == "cpu":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


PRECISIONS = ("auto", "fp32", "bf16")
_autocast_dtype: torch.dtype | None = None  # set once per process by `set_precision`


def set_precision(precision: str, device) -> torch.dtype | None:
    """Choose the autocast dtype of training forward passes and sampling (`autocast()`): bf16 on a CUDA device
    that supports it for 'auto' and 'bf16' (which fails where it is unsupported), none on the CPU or for 'fp32',
    so CPU runs stay bit-identical. Returns the dtype (None: full fp32)."""
    global _autocast_dtype
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    device = torch.device(device)
    supported = device.type == "cuda" and torch.cuda.is_bf16_supported()
    if precision == "bf16" and not supported:
        raise ValueError(f"gpu.precision 'bf16' needs a CUDA device with bfloat16 support; the device is {device}")
    _autocast_dtype = torch.bfloat16 if precision != "fp32" and supported else None
    return _autocast_dtype


def autocast():
    """The forward-pass autocast context `set_precision` chose (a no-op context when none was)."""
    if _autocast_dtype is None:
        return contextlib.nullcontext()
    return torch.autocast("cuda", dtype=_autocast_dtype)
