"""What each torchrun rank of tests/test_parallel.py does, and the one-process run it is compared with.

    python -m torch.distributed.run --standalone --nproc-per-node 2 tests/parallel_run.py fsdp OUT [none|bfloat16 [untied]]

Every rank trains `Pair` (the tiny Llama plus an add-on on its last hidden state) for STEPS AdamW steps on its
half of the global batch, in two gradient-accumulation shards (the first unsynced), then writes to OUT:
state.safetensors and saved/ (rank 0: the full state dict and `save_pretrained` with it), gathered<rank>.safetensors
(logits of uneven numbers of forward calls and a greedy generation inside `gathered()`), norms.safetensors
(rank 0: the gradient norm of every step) and facts<rank>.json (dtypes seen under mixed precision).
"""

import latentlab  # noqa: F401  (first: the CPU kernels pinned before torch loads)

# isort: split
import datetime
import json
import sys
from pathlib import Path

import torch

from latentlab.common.distributed import current_ranks
from latentlab.common.parallel import Trainable, TrainableGroup, clip_grad_norm
from tests.tiny import new_tiny_lm

STEPS, LR, MAX_NORM = 3, 1e-2, 1.0
BATCH, LENGTH, SHARDS_PER_RANK = 8, 12, 2
FORWARDS = (3, 7)  # inside gathered(): rank 0 makes 3 forward calls, rank 1 makes 7
PROMPT = 4  # tokens of the prompts the gathered forwards and generations start from


class Pair(torch.nn.Module):
    """A policy's shape: an LM and a small add-on trained with it (an MLP on the last hidden state)."""

    def __init__(self, tied: bool = True):
        super().__init__()
        self.lm, _ = new_tiny_lm()
        if not tied:  # Llama 3's layout: an output layer of its own
            self.lm.config.tie_word_embeddings = False
            self.lm.lm_head.weight = torch.nn.Parameter(self.lm.lm_head.weight.detach().clone() * 0.5)
        torch.manual_seed(1)
        self.addon = torch.nn.Sequential(torch.nn.Linear(32, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))

    def loss(self, ids: torch.Tensor) -> torch.Tensor:
        """Next-token loss (mean over the tokens of `ids` [B, T]) plus the add-on's mean square output. The tokens
        are embedded outside the model's forward, as a policy embeds a prefix."""
        embeds = self.lm.get_input_embeddings()(ids)  # [B, T, 32]
        out = self.lm(inputs_embeds=embeds, labels=ids, output_hidden_states=True)
        return out.loss + self.addon(out.hidden_states[-1]).pow(2).mean()  # hidden [B, T, 32] -> [B, T, 1]


def batch() -> torch.Tensor:
    """The global batch [BATCH, LENGTH], the same on every rank."""
    return torch.randint(3, 80, (BATCH, LENGTH), generator=torch.Generator().manual_seed(2))


def prompts(rank: int) -> list[torch.Tensor]:
    """Rank `rank`'s inputs of its forwards inside gathered(), each [2, PROMPT + i]: lengths differ by call."""
    generator = torch.Generator().manual_seed(10 + rank)
    return [torch.randint(3, 80, (2, PROMPT + i), generator=generator) for i in range(FORWARDS[rank])]


def grad_norm(pair: Pair) -> torch.Tensor:
    """The clipped norm over every parameter (FSDP's blocks are shards, the rest whole: parallel.clip_grad_norm)."""
    return clip_grad_norm(list(pair.parameters()), MAX_NORM)


def train_one_process(tied: bool = True) -> tuple[Pair, torch.Tensor]:
    """The reference: one process, the whole global batch in one pass per step. Returns the pair and the
    gradient norms [STEPS]."""
    pair = Pair(tied)
    optimizer = torch.optim.AdamW(pair.parameters(), lr=LR)
    norms = []
    for _ in range(STEPS):
        pair.loss(batch()).backward()
        norms.append(grad_norm(pair))
        optimizer.step()
        optimizer.zero_grad()
    return pair, torch.stack(norms)


def main(strategy: str, out: Path, param_dtype: torch.dtype | None, tied: bool = True) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))  # a deadlock fails, not hangs
    ranks = current_ranks()
    rank, world = ranks.rank, ranks.world
    pair = Pair(tied)
    group = TrainableGroup(
        Trainable(pair, "lm", ranks, strategy, param_dtype), Trainable(pair, "addon", ranks, strategy, param_dtype)
    )
    optimizer = torch.optim.AdamW(pair.parameters(), lr=LR)  # after sharding: FSDP's parameters are new DTensors
    mine = batch().chunk(world)[rank]  # [BATCH / world, LENGTH]
    facts, norms = {}, []
    for _ in range(STEPS):
        for k, part in enumerate(mine.chunk(SHARDS_PER_RANK)):
            with group.gradient_pass(sync=k == SHARDS_PER_RANK - 1):
                weight = len(part) / BATCH * world  # Shards.weight: the ranks' average is the global mean's
                (pair.loss(part) * weight).backward()
        facts["grad_dtype"] = str(pair.lm.model.layers[0].mlp.up_proj.weight.grad.dtype)
        facts["param_dtype"] = str(pair.lm.model.layers[0].mlp.up_proj.weight.dtype)
        norms.append(grad_norm(pair))
        optimizer.step()
        optimizer.zero_grad()

    lm_state, addon_state = (trainable.full_state_dict() for trainable in group.trainables)
    assert (lm_state == {} and addon_state == {}) == (rank != 0)
    if rank == 0:
        from safetensors.torch import save_file

        state = {f"lm.{k}": v for k, v in lm_state.items()} | {f"addon.{k}": v for k, v in addon_state.items()}
        save_file({k: v.clone() for k, v in state.items()}, out / "state.safetensors")  # clones: tied names
        save_file({"norms": torch.stack(norms)}, out / "norms.safetensors")
        pair.lm.save_pretrained(out / "saved", state_dict=lm_state)

    logits = {}
    with group.gathered(), torch.no_grad():
        facts["gathered_param_dtype"] = str(pair.lm.model.layers[0].mlp.up_proj.weight.dtype)
        for i, ids in enumerate(prompts(rank)):
            forward = pair.lm(ids).logits  # [2, PROMPT + i, vocab]
            facts["gathered_logits_dtype"] = str(forward.dtype)
            logits[f"forward{i}"] = forward.float()
        ids = prompts(rank)[0]
        new = FORWARDS[rank]  # generations of different lengths: different numbers of forward calls
        logits["generated"] = pair.lm.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False)
    total = torch.ones(())
    dist.all_reduce(total)  # collectives still paired after the uneven block
    assert total.item() == world
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in logits.items()}, out / f"gathered{rank}.safetensors")
    (out / f"facts{rank}.json").write_text(json.dumps(facts))
    dist.destroy_process_group()


if __name__ == "__main__":
    dtype = sys.argv[3] if len(sys.argv) > 3 else "none"  # none | bfloat16
    tied = not (len(sys.argv) > 4 and sys.argv[4] == "untied")
    main(sys.argv[1], Path(sys.argv[2]), None if dtype == "none" else getattr(torch, dtype), tied)
