"""What each torchrun rank of tests/test_surgery_shards.py does: attention surgery on FSDP2 shards, checked there.

    python -m torch.distributed.run --standalone --nproc-per-node 2 tests/surgery_shards_run.py OUT

For each layout (Llama's separate projections, GPT-2's fused Conv1D c_attn whose k bias straddles the two ranks'
rows, GPT-NeoX's per-head interleaved query_key_value: feature indices, not a slice), every rank shards a tiny
model's decoder blocks (`Trainable`, fsdp) and a plain copy stays whole beside it. The same `scale_heads` edit
is made on both inside a `SurgicalTheater`; the rank checks (and exits non-zero otherwise) that the sharded
model's forward equals the plain one's, the relative change equals the plain one's, leaving restores its shards
bit for bit, a committed edit gathers (`full_state_dict`) to the plain edited weights, and a `Learner`'s
`snapshot` / `restore` brings back shards, AdamW state and schedule so that the same step repeats bit for bit.
Rank 0 writes OUT/ok when every check passed.
"""

import latentlab  # noqa: F401  (first: the CPU kernels pinned before torch loads)

# isort: split
import datetime
import sys
from pathlib import Path

import torch

from latentlab.common.distributed import Shards, current_ranks
from latentlab.common.execution import Execution, Holder, Learner, Loss, Term
from latentlab.common.parallel import Trainable, local_rows
from latentlab.lm.surgery import SurgicalTheater, attention_targets, scale_heads
from tests.test_surgery_layouts import build

LAYOUTS = ("llama", "gpt2", "gpt_neox")


def factors(targets) -> torch.Tensor:
    heads = max(t.heads for t in targets)
    return 1 + 0.1 * (torch.rand(len(targets), heads, generator=torch.Generator().manual_seed(3)) * 2 - 1)


def ids() -> torch.Tensor:
    return torch.randint(3, 80, (2, 9), generator=torch.Generator().manual_seed(4))


def local_state(model) -> dict[str, torch.Tensor]:
    return {name: local_rows(p)[0].detach().clone() for name, p in model.named_parameters()}


def check_surgery(layout: str, ranks) -> None:
    plain, model = build(layout), build(layout)
    trainable = Trainable(Holder(model), "module", ranks, "fsdp")
    sharded_targets, plain_targets = attention_targets(model), attention_targets(plain)
    held = [local_rows(t.weight) for t in sharded_targets]
    assert all(len(local) < len(t.weight) for (local, _), t in zip(held, sharded_targets)), "a target is whole"
    assert all(first == ranks.rank * len(t.weight) // 2 for (_, first), t in zip(held, sharded_targets))
    edit = factors(plain_targets)
    before = local_state(model)
    with torch.no_grad():
        logits = plain(ids()).logits
        torch.testing.assert_close(model(ids()).logits, logits, rtol=0, atol=1e-6)
    with SurgicalTheater(plain, plain_targets) as theater:
        scale_heads(plain_targets, edit)
        expected_change = theater.relative_change()
        with torch.no_grad():
            edited_logits = plain(ids()).logits
    with SurgicalTheater(model, sharded_targets) as theater:
        scale_heads(sharded_targets, edit)
        change = theater.relative_change()  # a collective: every rank
        with torch.no_grad():
            torch.testing.assert_close(model(ids()).logits, edited_logits, rtol=0, atol=1e-6, msg=layout)
    assert abs(change - expected_change) <= 1e-12 * max(1.0, expected_change), (layout, change, expected_change)
    assert change > 0
    for name, value in local_state(model).items():
        assert torch.equal(value, before[name]), f"{layout}: {name} not restored"
    with torch.no_grad():
        torch.testing.assert_close(model(ids()).logits, logits, rtol=0, atol=1e-6)
    with SurgicalTheater(model, sharded_targets) as theater:
        scale_heads(sharded_targets, edit)
        theater.commit()
    scale_heads(plain_targets, edit)
    state = trainable.full_state_dict()  # the whole weights, on rank 0
    if ranks.rank == 0:
        for name, value in plain.state_dict().items():
            assert torch.equal(state[name], value), f"{layout}: {name} differs from the plain edit"


def check_learner_snapshot(ranks) -> None:
    model = build("llama").train()
    holder = Holder(model)
    learner = Learner(
        [(holder, "module")],
        lambda: list(model.parameters()),
        lr=1e-2,
        steps=4,
        warmup_steps=1,
        max_grad_norm=1.0,
        execution=Execution(shards=Shards(ranks.world, ranks), strategy="fsdp"),
    )
    assert learner.sharded
    batch = ids()[ranks.rank :: ranks.world]

    def step() -> dict[str, torch.Tensor]:
        def loss(part):
            out = holder.module(part, labels=part)
            return Loss({"nll": Term(out.loss * len(part), "rows")})

        learner.update([batch], loss=loss, counts=lambda part: {"rows": len(part)}, step=0)
        learner.step_schedule()
        return local_state(model)

    step()
    saved, lr = learner.snapshot(), learner.lr
    first = step()
    model.eval()
    learner.restore(saved)
    assert model.training and learner.lr == lr
    second = step()
    for name, value in first.items():
        assert torch.equal(value, second[name]), f"learner: {name} differs after restore"
    learner.restore(saved)  # the snapshot is intact after a restore and a step
    third = step()
    assert all(torch.equal(value, third[name]) for name, value in first.items())


def main(out: Path) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))  # a deadlock fails, not hangs
    ranks = current_ranks()
    for layout in LAYOUTS:
        check_surgery(layout, ranks)
    check_learner_snapshot(ranks)
    dist.barrier()
    if ranks.rank == 0:
        (out / "ok").write_text("ok\n")
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
