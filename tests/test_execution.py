"""The shard contract of the execution layer (latentlab/common/execution.py): one process given N shards
reproduces N ranks.

An algorithm hands `Learner.update` sums over each shard's items, each naming the count it is a mean over; the
layer divides by the count of the whole global batch (one all-reduce) however unevenly the items fall across
shards. These tests hold that contract on the layer alone, with tiny `nn.Linear` models and hand-computable
numbers, so that a broken normalisation fails here in seconds rather than in the end-to-end stage runs of
tests/test_ddp.py. Shard counts are deliberately unequal everywhere: equal shards hide the classic mistake (the
mean of shard means).
"""

import copy
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from latentlab.common.distributed import Ranks, Shards, shard_seed
from latentlab.common.execution import Execution, Holder, Learner, Loop, Loss, Term, fit, plain_means
from latentlab.common.tracking import StepLog

ROOT = Path(__file__).resolve().parents[1]


def test_shards_cut_the_batch_into_contiguous_slices_per_rank_each_with_its_own_seed():
    """Rank r of W holds shards r*L .. r*L+L-1 and cuts them contiguously from the global batch, so that one process
    with all the shards sees the very rows the ranks see; shard 0 keeps the run's seed (one shard is the run as it
    always was) and the others get distinct ones. A batch or a shard count that does not split is refused by name.
    """
    second = Shards(4, Ranks(rank=1, world=2))  # 4 shards over 2 ranks: rank 1 holds shards 2 and 3
    assert list(second.local) == [2, 3]
    assert second.split(list(range(8)), "k") == [[4, 5], [6, 7]]
    assert list(Shards(4, Ranks()).local) == [0, 1, 2, 3]  # one process: every shard
    assert shard_seed(5, 0) == 5 and len({shard_seed(5, k) for k in range(4)}) == 4
    with pytest.raises(ValueError, match="prompts_per_step \\(6\\) is not divisible by the 4 shards"):
        second.split(list(range(6)), "prompts_per_step")
    with pytest.raises(ValueError, match="3 shards cannot be spread evenly over 2 processes"):
        Shards(3, Ranks(world=2))


def scalar_learner(execution: Execution, lr: float = 0.1) -> tuple[Holder, Learner]:
    """y = w x with w = 0.5: one weight, so the gradient and the norm are numbers to work out on paper."""
    linear = nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        linear.weight.fill_(0.5)
    holder = Holder(linear)
    learner = Learner(
        [(holder, "module")],
        lambda: list(linear.parameters()),
        lr=lr,
        steps=1,
        max_grad_norm=100.0,
        execution=execution,
    )
    return holder, learner


def test_one_process_with_unequal_shards_minimises_the_global_token_mean_not_the_mean_of_shard_means():
    """Shard 0 holds 1 token (x = 2), shard 1 holds 3 (x = 1, 1, 1); w = 0.5. The objective is the token mean of
    w x over the global batch plus a per-shard regularizer w^2 (a mean over "shards") with coefficient 1/2:

        L = w (2 + 1 + 1 + 1) / 4 + 1/2 (w^2 + w^2) / 2 = 0.625 + 0.125 = 0.75
        dL/dw = 5/4 + w = 1.75           (the mean of shard means would give (2 + 1) / 2 + w = 2)

    The stat x^2 is a token mean too: (4 + 1 + 1 + 1) / 4 = 1.75 (the mean of shard means: 2.5). Every number is
    a binary fraction, so the checks are exact. AdamW's first step moves w by lr * g / |g|: its direction.
    """
    holder, learner = scalar_learner(Execution(shards=Shards(2, Ranks())))
    parts = [torch.tensor([[2.0]]), torch.tensor([[1.0], [1.0], [1.0]])]

    def loss(x: torch.Tensor) -> Loss:
        out = holder.module(x)
        objective = {"linear": Term(out.sum(), "tokens"), "reg": Term(holder.module.weight.pow(2).sum(), "shards", 0.5)}
        return Loss(objective, {"square": Term((x**2).sum(), "tokens"), "out": Term(out.sum().detach(), "tokens")})

    row = learner.update(parts, loss=loss, counts=lambda x: {"tokens": x.shape[0], "shards": 1}, step=0)
    weight = holder.module.weight
    assert weight.grad.item() == 1.75  # the gradient the optimizer stepped with (no clipping at 100)
    assert row == {"loss": 0.75, "square": 1.75, "out": 0.625, "grad_norm": 1.75}
    assert weight.item() == pytest.approx(0.5 - 0.1, abs=1e-7)


def test_one_process_with_one_shard_is_plain_means_bit_for_bit():
    """With one shard on one process nothing is rescaled: `Learner.update` minimises and logs exactly what
    `plain_means` computes (the single-process trainers' arithmetic, which their golden numbers pin), to the last
    bit, on floats that are not binary fractions. A count of 0 (an empty shard) gives a mean of 0, not NaN."""
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(2, 5, 3, generator=generator)
    mask = torch.rand(2, 5, generator=generator) < 0.6
    linear = nn.Linear(3, 2)
    twin = nn.Linear(3, 2)
    twin.load_state_dict(linear.state_dict())

    def loss_of(model: nn.Module) -> Loss:
        out = model(x).pow(2).sum(-1)
        tokens = torch.where(mask, out, 0.0)
        rows = tokens.sum(1) / mask.sum(1).clamp(min=1)
        return Loss(
            {"tokens": Term(tokens.sum(), "tokens"), "rows": Term(rows.sum(), "rows", weight=0.3)},
            {"abs": Term(torch.where(mask, model(x).abs().sum(-1), 0.0).sum().detach(), "tokens"),
             "none": Term(torch.tensor(0.0), "empty")},
        )  # fmt: skip

    def counts(_) -> dict:
        return {"tokens": mask.sum(), "rows": mask.shape[0], "empty": 0}

    holder = Holder(linear)
    learner = Learner([(holder, "module")], lambda: list(linear.parameters()), lr=0.1, steps=1, max_grad_norm=100.0)
    row = learner.update([None], loss=lambda _: loss_of(holder.module), counts=counts, step=0)
    objective, stats = plain_means(loss_of(twin), counts(None))
    objective.backward()
    assert row["loss"] == objective.item()
    assert {k: v for k, v in row.items() if k not in ("loss", "grad_norm")} == stats
    assert stats["none"] == 0.0
    grads = [p.grad for p in linear.parameters()]
    assert all(torch.equal(a, b.grad) for a, b in zip(grads, twin.parameters()))
    assert row["grad_norm"] == torch.nn.utils.get_total_norm(grads).item()


def test_a_restored_snapshot_repeats_the_steps_bit_for_bit_and_stays_intact():
    """`Learner.snapshot()` then steps, `restore`, the same steps: the same weights, AdamW state, learning rate and
    train modes, to the last bit, twice (restoring copies the snapshot: the optimizer steps its own tensors)."""
    model = nn.Sequential(nn.Linear(3, 4), nn.Dropout(0.0), nn.Linear(4, 2))
    holder = Holder(model)
    learner = Learner(
        [(holder, "module")], lambda: list(model.parameters()), lr=0.1, steps=6, warmup_steps=2, max_grad_norm=1.0
    )
    x = torch.randn(5, 3, generator=torch.Generator().manual_seed(2))

    def steps(n: int) -> tuple[dict, dict, float]:
        for i in range(n):
            row = learner.update(
                [None],
                loss=lambda _: Loss({"y": Term(holder.module(x).pow(2).sum(), "rows")}),
                counts=lambda _: {"rows": 5},
                step=i,
            )
            assert row["loss"] > 0
            learner.step_schedule()
        state = {k: v.clone() for k, v in model.state_dict().items()}
        return state, copy.deepcopy(learner.optimizer.state_dict()), learner.lr

    steps(2)
    model[1].eval()  # a mixed train mode is part of the state
    snapshot = learner.snapshot()
    first = steps(3)
    model.train()
    for _ in range(2):
        learner.restore(snapshot)
        assert not model[1].training and model[0].training
        again = steps(3)
        assert again[2] == first[2]
        assert all(torch.equal(again[0][k], v) for k, v in first[0].items())
        for key, state in first[1]["state"].items():
            assert all(torch.equal(again[1]["state"][key][name], value) for name, value in state.items())


# The contract on real ranks: the same 3 AdamW steps on 2 gloo processes (one shard each) and on one process given
# the 2 shards. Each step's global batch has 4 rows whose token counts are LENGTHS[step]: the two shards (rows 0-1
# and 2-3) never hold equally many tokens.
STEPS, WIDTH, SEED = 3, 4, 11
LENGTHS = [[1, 2, 4, 4], [4, 3, 1, 1], [1, 1, 3, 2]]


class Tiny(nn.Module):
    """A small MLP held as `model` (the layer wraps (owner, "model")); the same weights on every process."""

    def __init__(self):
        super().__init__()
        self.model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2))
        generator = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for parameter in self.model.parameters():
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.5)


@dataclass
class Batch:
    x: torch.Tensor  # (rows, WIDTH, 3)
    y: torch.Tensor  # (rows, WIDTH, 2)
    mask: torch.Tensor  # (rows, WIDTH) the row's tokens


def sample(rows: list[int], lengths: list[int], generator: torch.Generator) -> Batch:
    """One shard of the global batch, drawn from the shard's own stream (as a trainer's `sample`)."""
    x = torch.randn(len(rows), WIDTH, 3, generator=generator)
    y = torch.randn(len(rows), WIDTH, 2, generator=generator)
    return Batch(x, y, torch.arange(WIDTH)[None] < torch.tensor(lengths)[:, None])


def train(shards: Shards, learner_class: type[Learner] = Learner) -> dict:
    """3 steps of a token mean (squared error) plus a row mean, stats over tokens and rows, clipping active, under
    `fit`; returns the final parameters and the logged rows."""
    owner, execution = Tiny(), Execution(shards=shards)
    learner = learner_class(
        [(owner, "model")], lambda: list(owner.model.parameters()),
        lr=0.05, steps=STEPS, warmup_steps=1, weight_decay=0.01, max_grad_norm=0.5, execution=execution,
    )  # fmt: skip
    generators = shards.generators(SEED, "cpu")

    def loss(batch: Batch) -> Loss:
        out = owner.model(batch.x)
        error = torch.where(batch.mask, (out - batch.y).pow(2).sum(-1), 0.0)
        per_row = error.sum(1) / batch.mask.sum(1)
        objective = {"mse": Term(error.sum(), "tokens"), "row": Term(per_row.sum(), "rows", weight=0.5)}
        stats = {
            "abs_error": Term(torch.where(batch.mask, (out - batch.y).abs().sum(-1), 0.0).sum().detach(), "tokens"),
            "first": Term(out[:, 0, 0].sum().detach(), "rows"),
        }
        return Loss(objective, stats)

    def counts(batch: Batch) -> dict:
        return {"tokens": batch.mask.sum(), "rows": batch.mask.shape[0]}

    def step(i: int) -> dict[str, float]:
        parts = learner.sample(sample, list(range(4)), LENGTHS[i], generators, "rows")
        row = learner.update(parts, loss=loss, counts=counts, step=i)
        learner.step_schedule()
        return row

    log = StepLog()
    fit(STEPS, step, Loop(log=log, desc="contract"), execution)
    return {"parameters": [p.detach().clone() for p in owner.model.parameters()], "rows": log.rows}


class LocalCounts(Learner):
    """The mutation: each rank divides by its OWN shards' counts (the all-reduce of the counts skipped). On one
    process that is the global count still; on ranks with unequal shards it is the mean of shard means."""

    def _global_counts(self, per_part):
        return {name: max(sum(float(c[name]) for c in per_part), 1.0) for name in per_part[0]}


LEARNERS = {"learner": Learner, "local_counts": LocalCounts}

WORKER = """
import latentlab  # first: the CPU kernels pinned before torch loads
import json
import sys

import torch
from safetensors.torch import save_file

from latentlab.common.distributed import Shards, distributed
from tests.test_execution import LEARNERS, train

torch.set_num_threads(1)
with distributed() as ranks:
    results = {name: train(Shards(2, ranks), learner) for name, learner in LEARNERS.items()}
out = f"{sys.argv[1]}/rank{ranks.rank}"
for name, result in results.items():  # safetensors and JSON: never pickle
    save_file({str(i): p.contiguous() for i, p in enumerate(result["parameters"])}, f"{out}-{name}.safetensors")
with open(f"{out}.json", "w") as rows:
    json.dump({name: result["rows"] for name, result in results.items()}, rows)
"""


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    """Both learners trained on 2 gloo processes under torchrun, one shard each: each rank's results."""
    directory = tmp_path_factory.mktemp("ranks")
    (directory / "worker.py").write_text(WORKER)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "LATENTLAB_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    result = subprocess.run(
        [*command, str(directory / "worker.py"), str(directory)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]
    return [read_rank(directory / f"rank{rank}") for rank in range(2)]


def read_rank(prefix: Path) -> dict:
    """One rank's results as the worker wrote them: per learner, its final parameters (in order) and log rows."""
    rows = json.loads(prefix.with_suffix(".json").read_text())
    results = {}
    for name in LEARNERS:
        tensors = load_file(f"{prefix}-{name}.safetensors")
        results[name] = {"parameters": [tensors[str(i)] for i in range(len(tensors))], "rows": rows[name]}
    return results


def differences(a: dict, b: dict) -> tuple[float, float]:
    """The largest gaps between two runs: in their final parameters, and in their logged values (the same steps
    and columns)."""
    assert [row["step"] for row in a["rows"]] == [row["step"] for row in b["rows"]] == list(range(STEPS))
    assert [row.keys() for row in a["rows"]] == [row.keys() for row in b["rows"]]
    parameters = max((p - q).abs().max().item() for p, q in zip(a["parameters"], b["parameters"], strict=True))
    return parameters, max(abs(r[k] - s[k]) for r, s in zip(a["rows"], b["rows"]) for k in r)


def test_two_ranks_with_a_shard_each_match_one_process_with_both_shards(ranks):
    """The contract itself: unequal shards on 2 real ranks (DDP's gradient average, the all-reduced counts and
    means) give the parameters and the logged rows of one process accumulating both shards, step by step.
    Both ranks log the same global row."""
    shard_tokens = [[sum(lengths[:2]), sum(lengths[2:])] for lengths in LENGTHS]
    assert all(a != b for a, b in shard_tokens)  # the shards are unequal, or the test proves nothing
    one = train(Shards(2, Ranks()))
    assert ranks[0]["learner"]["rows"] == ranks[1]["learner"]["rows"]
    assert max(differences(ranks[0]["learner"], one)) < 1e-6  # (0.0 exactly on x86-64 today)
    assert one["rows"][-1]["grad_norm"] > 0.5  # clipping was active: the norm is of the global gradient too


def test_the_contract_test_fails_when_the_ranks_skip_the_all_reduce_of_the_counts(ranks):
    """The mutation check of the test above: a learner dividing by its rank's own counts is invisible in one
    process (its counts are the global ones: bit for bit the right run) and must be visible on ranks."""
    one = train(Shards(2, Ranks()))
    mutated = train(Shards(2, Ranks()), LocalCounts)
    assert differences(mutated, one) == (0.0, 0.0)
    parameters, rows = differences(ranks[0]["local_counts"], one)
    assert parameters > 1e-3 and rows > 1e-3


def test_fit_evaluates_on_the_leader_alone_every_k_steps_and_at_the_last_and_logs_every_log_every():
    """10 steps, evaluation every 4, a row every 2: the leader evaluates at 0, 4, 8 and the last step (9), and
    only there do its rows carry the held-out metric; another rank never evaluates (it would wait in the next
    step's collectives). Rows are logged at 0, 2, 4, 6, 8 and the last, on every rank; every step runs."""
    for rank in (0, 1):
        execution = Execution(shards=Shards(2, Ranks(rank=rank, world=2)))
        stepped, evaluated, log = [], [], StepLog()

        def step(i: int, stepped=stepped) -> dict[str, float]:
            stepped.append(i)
            return {"loss": float(i)}

        def evaluate(evaluated=evaluated, stepped=stepped) -> dict[str, float]:
            evaluated.append(stepped[-1])
            return {"heldout": 10.0 * stepped[-1]}

        fit(10, step, Loop(log=log, desc="fit", evaluate=evaluate, eval_every=4, log_every=2), execution)
        assert stepped == list(range(10))
        assert [row["step"] for row in log.rows] == [0, 2, 4, 6, 8, 9]
        assert [row["loss"] for row in log.rows] == [0.0, 2.0, 4.0, 6.0, 8.0, 9.0]
        if rank == 0:
            assert evaluated == [0, 4, 8, 9]
            assert [row["step"] for row in log.rows if "heldout" in row] == [0, 4, 8, 9]
            assert all(row["heldout"] == 10.0 * row["step"] for row in log.rows if "heldout" in row)
        else:
            assert evaluated == [] and not any("heldout" in row for row in log.rows)


def test_fit_without_an_evaluation_period_never_evaluates_and_logs_every_step_by_default():
    """eval_every=0 turns evaluation off even with an `evaluate` given; log_every defaults to every step, and the
    last step is logged even when it is off the period (8 steps, a row every 3: 0, 3, 6 and the last, 7)."""
    evaluated, log = [], StepLog()
    fit(4, lambda i: {"loss": float(i)}, Loop(log=log, desc="fit", evaluate=lambda: evaluated.append(1) or {}))
    assert evaluated == [] and [row["step"] for row in log.rows] == [0, 1, 2, 3]
    log = StepLog()
    fit(8, lambda i: {"loss": float(i)}, Loop(log=log, desc="fit", log_every=3))
    assert [row["step"] for row in log.rows] == [0, 3, 6, 7]
