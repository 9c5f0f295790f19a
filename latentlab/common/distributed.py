"""torchrun support: which worker this process is, and a barrier (nothing to do without torchrun).

    with distributed() as ranks:      # torchrun --nproc_per_node 2 -m stages.label
        ranks.rank, ranks.world, ranks.barrier()

gloo on the CPU, nccl with one GPU per worker (cuda:LOCAL_RANK becomes the current device).
"""

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Ranks:
    rank: int = 0
    world: int = 1
    barrier: Callable[[], None] = lambda: None


@contextmanager
def distributed() -> Iterator[Ranks]:
    """The process group torchrun describes in the environment (WORLD_SIZE, RANK, ...), if any."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        yield Ranks()
        return
    import torch.distributed as dist

    gpu = torch.cuda.is_available()
    if gpu:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend="nccl" if gpu else "gloo")
    try:
        yield Ranks(dist.get_rank(), dist.get_world_size(), dist.barrier)
    finally:
        dist.destroy_process_group()
