"""How a training stage runs its trainer (latentlab/common/execution.py): the shards of its global batch.

Sampling stages (grpo, inject, surgery, nla_rl) cut each batch into `launcher.shards` shards, each with its own
sampling stream, so one process given N shards reproduces N processes. Supervised stages (base, sft, nla_sft,
policy) cut it into one shard per process: one process is their reference.
"""

from latentlab.common.distributed import Shards
from latentlab.common.execution import Execution
from stages.common import Run


def sampling(run: Run) -> Execution:
    """A sampling stage's execution: `run.shards` (launcher.shards), one sampling stream each."""
    return Execution(shards=run.shards)


def supervised(run: Run) -> Execution:
    """A supervised stage's execution: one shard per process."""
    return Execution(shards=Shards(run.ranks.world, run.ranks))
