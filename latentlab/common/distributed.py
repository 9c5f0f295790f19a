"""torchrun support: which worker this process is, and how a global batch is cut into shards.

    with distributed() as ranks:      # torchrun --nproc_per_node 2 -m stages.label
        ranks.rank, ranks.world, ranks.barrier()

gloo on the CPU, nccl with one GPU per worker (cuda:LOCAL_RANK becomes the current device).

The sharding contract of every trainer (`Shards`): the global batch is cut into `count` equal, contiguous
shards; rank r handles shards r*L .. r*L+L-1 (L = count / world, at least 1). Shard k samples with its own
stream seeded `shard_seed(seed, k)`, and shard 0's seed is the run's own, so one process with one shard is
the run as it always was. One process given `count` shards samples every shard with its own stream and
accumulates their gradients: it reproduces a run on `count` ranks step by step (within float tolerance).
Gradients are averaged across ranks by the wrapper of the trainable modules (latentlab/common/parallel.py);
the execution layer (latentlab/common/execution.py) normalises every loss by its global count so that this
average is the gradient of the global loss.
"""

import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch

SHARD_STRIDE = 1_000_003  # a prime: shard seeds of nearby run seeds do not collide for any realistic count


@dataclass(frozen=True)
class Ranks:
    rank: int = 0
    world: int = 1
    barrier: Callable[[], None] = lambda: None


def current_ranks() -> Ranks:
    """This process's place in the process group `distributed()` started (one process without one)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return Ranks(dist.get_rank(), dist.get_world_size(), dist.barrier)
    return Ranks()


@contextmanager
def distributed() -> Iterator[Ranks]:
    """The process group torchrun describes in the environment (WORLD_SIZE, RANK, ...), if any.

    Re-entrant: inside a group already started, it yields that group and leaves it running.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        yield Ranks()
        return
    import torch.distributed as dist

    if dist.is_initialized():
        yield current_ranks()
        return
    gpu = torch.cuda.is_available()
    if gpu:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend="nccl" if gpu else "gloo")
    try:
        yield current_ranks()
    finally:
        dist.destroy_process_group()


def shard_seed(seed: int, shard: int) -> int:
    """The seed of shard `shard`'s sampling stream: `seed` itself for shard 0, distinct ones after it."""
    return seed + SHARD_STRIDE * shard


@dataclass(frozen=True)
class Shards:
    """How a global batch is cut across ranks (and, in one process, into gradient-accumulation shards)."""

    count: int = 1
    """Shards of the global batch in the whole job (a multiple of the world size)."""
    ranks: Ranks = Ranks()

    def __post_init__(self):
        if self.count < 1 or self.count % self.ranks.world:
            raise ValueError(f"{self.count} shards cannot be spread evenly over {self.ranks.world} processes")

    @classmethod
    def of(cls, count: int, ranks: Ranks | None = None) -> "Shards":
        """`count` shards (0: one per process) over `ranks` (default: this process's group)."""
        ranks = ranks or current_ranks()
        return cls(count or ranks.world, ranks)

    @property
    def single(self) -> bool:
        """One process, one shard: the run as it was before sharding existed (nothing is rescaled)."""
        return self.count == 1

    @property
    def local(self) -> range:
        """The shards this rank handles."""
        per_rank = self.count // self.ranks.world
        return range(self.ranks.rank * per_rank, (self.ranks.rank + 1) * per_rank)

    def split(self, items: Sequence, key: str) -> list[Sequence]:
        """`items` (the global batch) cut into this rank's shards; `key` names the param that sets the batch size."""
        if len(items) % self.count:
            raise ValueError(f"{key} ({len(items)}) is not divisible by the {self.count} shards of the batch")
        size = len(items) // self.count
        return [items[k * size : (k + 1) * size] for k in self.local]

    def map(self, fn, prompts: Sequence, targets: Sequence, generators: Sequence, key: str) -> list:
        """`fn(prompts, targets, generator)` on each local shard of the global batch (prompts and targets cut
        alike by `split`, one sampling stream per shard), in shard order."""
        return [fn(p, t, g) for p, t, g in zip(self.split(prompts, key), self.split(targets, key), generators)]

    def generators(self, seed: int, device) -> list[torch.Generator]:
        """One sampling stream per local shard, seeded `shard_seed(seed, k)`."""
        return [torch.Generator(device=device).manual_seed(shard_seed(seed, k)) for k in self.local]

    def sum(self, value: torch.Tensor) -> torch.Tensor:
        """`value` summed over the ranks (a copy; the value itself with one process)."""
        if self.ranks.world == 1:
            return value
        import torch.distributed as dist

        total = value.clone()
        dist.all_reduce(total)
        return total

    def gather(self, value: torch.Tensor) -> torch.Tensor:
        """Every rank's `value` (equal shapes) concatenated along dim 0 in rank order."""
        if self.ranks.world == 1:
            return value
        import torch.distributed as dist

        parts = [torch.empty_like(value) for _ in range(self.ranks.world)]
        dist.all_gather(parts, value.contiguous())
        return torch.cat(parts)


ONE_PROCESS = Shards()  # one process, one shard: the default of every trainer
