"""The execution layer: everything about a training update that is not the algorithm.

An algorithm hands the layer what is its own, per shard of the global batch (latentlab/common/distributed.py):

    parts = learner.sample(sample_shard, prompts, targets, generators, "grpo.prompts_per_step")
    row = learner.update(parts, loss=loss_of_shard, counts=counts_of_shard, step=step)

`counts(part)` names the denominators of the algorithm's means on that shard (completions, tokens, targets...),
known before any forward pass; `loss(part)` returns a `Loss`: sums over the shard's items, each naming the
count it is a mean over. The layer owns the rest: sampling under the strategy's gathered weights, the global
denominators (one all-reduce), the wrappers of the trainable modules (DDP or FSDP2), the optimizer, its
schedule, clipping and the finite-loss check, the logged global means, the training loop with its evaluation
schedule (`fit`), and which rank logs.

The normalisation, once for every algorithm. The global objective is

    L = sum_t S_t / N_t        S_t: term t summed over the whole global batch, N_t: its count there

Shard k on rank r backpropagates s_tk * W / N_t (W ranks). Gradients of a rank's shards accumulate (a sum)
and DDP and FSDP2 average them over the ranks (a division by W), so the update is the gradient of L, however
unevenly the items fall across shards. One process with one shard backpropagates s / n: the plain mean,
bit for bit what a single-process trainer always computed.
"""

import copy
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch

from latentlab.common.distributed import ONE_PROCESS, Shards
from latentlab.common.optim import build_optimizer, check_finite
from latentlab.common.parallel import Strategy, Trainable, TrainableGroup, clip_grad_norm
from latentlab.common.runtime import autocast
from latentlab.common.tracking import StepLog, progress

Count = int | float | torch.Tensor


@dataclass(frozen=True)
class Term:
    """A sum over a shard's items, the name of the count it is a mean over (`over`), and the coefficient of that
    mean in the objective (`weight`: a value loss's coefficient, say)."""

    sum: torch.Tensor
    over: str
    weight: float = 1.0

    def normalised(self, count: Count) -> torch.Tensor:
        mean = self.sum / count
        return mean if self.weight == 1.0 else self.weight * mean


@dataclass
class Loss:
    """One shard's loss: the global means of the `objective` terms are summed and minimised (and logged as
    `loss`); each of `stats` is logged as its global mean (a regularizer worth its own column is in both)."""

    objective: dict[str, Term]
    stats: dict[str, Term] = field(default_factory=dict)


@dataclass(frozen=True, kw_only=True)
class Execution:
    """How a trainer runs: the one context every trainer takes. `Execution()`: one process, one shard."""

    shards: Shards = ONE_PROCESS
    """How each global batch is cut across ranks and local shards."""
    strategy: Strategy = "ddp"
    """How the trainable modules are spread over the ranks: replicated (DDP) or sharded (FSDP2)."""

    @property
    def leader(self) -> bool:
        """Rank 0: the one process that evaluates, logs and writes."""
        return self.shards.ranks.rank == 0


ONE = Execution()


@dataclass
class Holder:
    """A lone trained module (an LM, a critic): the execution layer swaps its gradient-pass wrapper in as
    `.module`, so the loss always calls `holder.module(...)`."""

    module: torch.nn.Module


def _clamped(count: Count) -> Count:
    """A denominator that is never 0 (an empty shard's mean is 0, not NaN)."""
    return count.clamp(min=1) if isinstance(count, torch.Tensor) else max(count, 1)


def _cloned(value: Any) -> Any:
    """`value` with every tensor in it cloned (a DTensor stays one) and the rest deep-copied."""
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, dict):
        out = type(value)((key, _cloned(item)) for key, item in value.items())
        if hasattr(value, "_metadata"):  # a module state dict's versions, read by load_state_dict
            out._metadata = copy.deepcopy(value._metadata)
        return out
    if isinstance(value, list | tuple):
        return type(value)(_cloned(item) for item in value)
    return copy.deepcopy(value)


class Learner:
    """The optimizer of an algorithm's trainable modules, and the one update step of every trainer.

    `trainable`: (owner, attribute) of each module that trains (a policy's `model`, its `injector`, a value
    head...), wrapped for the gradient passes as `execution.strategy` says; `parameters()`: the parameters the
    optimizer steps, in a fixed order (the clipping norm's sum follows it), read after wrapping.
    """

    def __init__(
        self,
        trainable: Sequence[tuple[Any, str]],
        parameters: Callable[[], list[torch.nn.Parameter]],
        *,
        lr: float,
        steps: int,
        max_grad_norm: float,
        warmup_steps: int = 0,
        weight_decay: float = 0.0,
        execution: Execution = ONE,
    ):
        self.execution, self.shards = execution, execution.shards
        self.trainable = list(trainable)
        self.wrapped = TrainableGroup(*self._wrap())
        self.parameters = parameters()
        self.optimizer, self.schedule = build_optimizer(self.parameters, lr, steps, warmup_steps, weight_decay)
        self.max_grad_norm = max_grad_norm

    def _wrap(self) -> list[Trainable]:
        strategy, ranks = self.execution.strategy, self.shards.ranks
        return [Trainable(owner, attr, ranks, strategy) for owner, attr in self.trainable]

    @property
    def sharded(self) -> bool:
        """Whether a trainable module is sharded over the ranks (fsdp with several processes): then every forward
        outside `scoring` is a collective, and whole weights must be gathered to be saved (`whole`)."""
        return any(module.sharded for module in self.wrapped.trainables)

    def snapshot(self) -> dict:
        """The training state to come back to (`restore`): each trained module's state dict and its modules' train
        modes, the optimizer's and the schedule's state, all copied (a shard stays a shard: under fsdp each rank
        keeps its own rows). Never a copy of a module, so it works on sharded modules too (which cannot be copied);
        sampling streams are the caller's."""
        return {
            "modules": [
                (_cloned(module.state_dict()), [m.training for m in module.modules()]) for module in self._modules()
            ],
            "optimizer": _cloned(self.optimizer.state_dict()),
            "schedule": _cloned(self.schedule.state_dict()),
        }

    def restore(self, snapshot: dict) -> None:
        """The trained modules, optimizer and schedule as they were at `snapshot` (in place: every wrapper, the
        optimizer and whoever holds a parameter keep theirs). `snapshot` stays intact for another restore."""
        with torch.no_grad():
            for module, (state, modes) in zip(self._modules(), snapshot["modules"], strict=True):
                module.load_state_dict(state)  # copied into the parameters and buffers (shards into shards)
                for m, mode in zip(module.modules(), modes, strict=True):
                    m.training = mode
        # copies: an optimizer keeps the tensors it is given as its state and steps them in place
        self.optimizer.load_state_dict(_cloned(snapshot["optimizer"]))
        self.schedule.load_state_dict(_cloned(snapshot["schedule"]))

    def _modules(self) -> list[torch.nn.Module]:
        return [getattr(owner, attr) for owner, attr in self.trainable]

    @property
    def lr(self) -> float:
        return self.schedule.get_last_lr()[0]

    def whole(self):
        """The trained modules as they are saved: under fsdp every rank gathers their whole state to rank 0 (a
        collective: every rank enters), where their `state_dict()` then returns it, so any saver (save_pretrained,
        a safetensors file) writes the plain module's weights. Nothing to do otherwise."""
        return self.wrapped.whole_state()

    def sample(self, fn: Callable, prompts: Sequence, targets: Sequence, generators: Sequence, key: str) -> list:
        """`fn(prompts, targets, generator)` on each of this rank's shards of the global batch (`key`: the param
        that sets its size, named when it does not split), in `scoring` mode."""
        with self.scoring():
            return self.shards.map(fn, prompts, targets, generators, key)

    @contextmanager
    def scoring(self) -> Iterator[None]:
        """No-gradient passes of the trainable modules (sampling, pi_old, held-out evaluation): whole weights on
        every rank (fsdp: gathered once, so the ranks may make different numbers of forward calls), at the run's
        precision (bf16 autocast on a GPU per gpu.precision, nothing on the CPU)."""
        with self.wrapped.gathered(), torch.no_grad(), autocast():
            yield

    def update(
        self,
        parts: Sequence,
        *,
        loss: Callable[[Any], Loss],
        counts: Callable[[Any], dict[str, Count]],
        step: int,
    ) -> dict[str, float]:
        """One optimizer update on the global batch whose local shards are `parts`; returns the objective's global
        value `loss`, the global mean of every stat, and the gradient norm before clipping `grad_norm`."""
        denominators = self._global_counts([counts(part) for part in parts])
        world = self.shards.ranks.world
        # s / (N / W): the ranks' gradient average then divides by W (module docstring); N itself on one process
        scales = denominators if world == 1 else {name: n / world for name, n in denominators.items()}
        self.optimizer.zero_grad(set_to_none=True)
        sums: dict[str, list[tuple[torch.Tensor, str]]] = {}
        totals: list[torch.Tensor] = []
        for k, part in enumerate(parts):
            with self.wrapped.gradient_pass(sync=k == len(parts) - 1):
                with autocast():  # the run's precision: bf16 on a GPU per gpu.precision, nothing on the CPU
                    result = loss(part)
                objective = sum(term.normalised(scales[term.over]) for term in result.objective.values())
                objective.backward()
            totals.append(objective.detach())
            for name, term in result.stats.items():
                sums.setdefault(name, []).append((term.sum.detach(), term.over))
        row = self._global_means(sums, denominators, totals)
        check_finite(torch.tensor(row["loss"]), step)
        grad_norm = clip_grad_norm(self.parameters, self.max_grad_norm)
        self.optimizer.step()
        return {**row, "grad_norm": float(grad_norm)}

    def _global_counts(self, per_part: list[dict[str, Count]]) -> dict[str, Count]:
        """Each count summed over the local shards and the ranks (one all-reduce), never 0. One process with
        one shard: its own counts untouched, so its means are the plain single-process ones."""
        if len(per_part) == 1 and self.shards.ranks.world == 1:
            return {name: _clamped(count) for name, count in per_part[0].items()}
        names = list(per_part[0])
        local = torch.tensor([sum(float(c[name]) for c in per_part) for name in names], dtype=torch.float64)
        return {name: max(total, 1.0) for name, total in zip(names, self.all_sum(local).tolist())}

    def _global_means(self, sums, denominators, totals) -> dict[str, float]:
        """The logged row: each name's global sum over its global count, and the objective's global value."""
        if len(totals) == 1 and self.shards.ranks.world == 1:  # the single-process arithmetic, bit for bit
            means = {name: (values[0][0] / denominators[values[0][1]]).item() for name, values in sums.items()}
            return {"loss": totals[0].item(), **means}
        names = list(sums)
        local = [sum(float(s) for s, _ in sums[name]) for name in names]
        # the objective as backpropagated: sum_k s_k W / N over this rank's shards, averaged over the ranks
        local.append(sum(float(t) for t in totals))
        world = self.shards.ranks.world
        reduced = self.all_sum(torch.tensor(local, dtype=torch.float64)).tolist()
        means = {name: reduced[i] / denominators[sums[name][0][1]] for i, name in enumerate(names)}
        return {"loss": reduced[-1] / world, **means}

    def all_sum(self, value: torch.Tensor) -> torch.Tensor:
        """`value` summed over the ranks (on the device the collective needs)."""
        device = self.parameters[0].device if self.parameters else value.device
        return self.shards.sum(value.to(device)).to(value.device)

    def gather(self, value: torch.Tensor) -> torch.Tensor:
        """Every rank's `value` (equal shapes) concatenated in rank order: whole-batch logs of per-row values."""
        return self.shards.gather(value)

    def step_schedule(self) -> None:
        self.schedule.step()


@dataclass(frozen=True, kw_only=True)
class Loop:
    """How a training loop reports: the one keyword-only context of every loop (`fit`, `train_rl`,
    `run_curriculum`)."""

    log: StepLog
    """Where each logged row goes (plots/<stage>.csv, DVCLive, W&B)."""
    desc: str
    """The progress bar's label."""
    evaluate: Callable[[], dict[str, float]] | None = None
    """Held-out metrics added to the row every `eval_every` steps and at the last (rank 0 alone)."""
    eval_every: int = 0
    """0: never evaluate."""
    log_every: int = 1
    """A row every this many steps, and at the last."""


def fit(
    steps: int,
    step: Callable[[int], dict[str, float]],
    loop: Loop,
    execution: Execution = ONE,
    learners: Sequence["Learner"] = (),
) -> None:
    """The training loop: `step(i)` for i < `steps` under a progress bar, rows and held-out metrics as `loop`
    says. Evaluation runs on rank 0 alone (the others go on to the next step's collectives and wait there), but
    where `learners` shard a module (fsdp) every rank evaluates alike, in their `scoring` mode: a sharded forward
    is a collective, so no rank may skip it; rank 0's result is logged."""
    everywhere = any(learner.sharded for learner in learners)
    bar = progress(range(steps), loop.desc)
    loop.log.bar = bar
    for i in bar:
        row = step(i)
        evaluated = loop.evaluate is not None and loop.eval_every and logged(i, steps, loop.eval_every)
        if evaluated and everywhere:
            with ExitStack() as stack:
                for learner in learners:
                    stack.enter_context(learner.scoring())
                held_out = loop.evaluate()
            if execution.leader:
                row.update(held_out)
        elif evaluated and execution.leader:
            row.update(loop.evaluate())
        if evaluated or logged(i, steps, loop.log_every):  # an evaluation is never computed to be dropped
            loop.log.log(i, **row)


def logged(step: int, steps: int, every: int) -> bool:
    """Whether step `step` of `steps` is one of every `every` (counting from 0), or the last."""
    return step % every == 0 or step == steps - 1


class Throughput:
    """Tokens per second of the whole job and seconds per step since the last logged row."""

    def __init__(self):
        self.started = self.last_time = time.perf_counter()
        self.last_step = -1

    def seconds_per_step(self, step: int) -> float:
        now = time.perf_counter()
        seconds = (now - self.last_time) / (step - self.last_step)
        self.last_step, self.last_time = step, now
        return seconds

    def elapsed(self) -> float:
        return time.perf_counter() - self.started


def plain_means(loss: Loss, counts: dict[str, Count]) -> tuple[torch.Tensor, dict[str, float]]:
    """One shard on its own: (the objective, each stat's mean), as `Learner.update` minimises and logs them in
    one process with one shard."""
    counts = {name: _clamped(count) for name, count in counts.items()}
    objective = sum(term.normalised(counts[term.over]) for term in loss.objective.values())
    return objective, {name: (term.sum.detach() / counts[term.over]).item() for name, term in loss.stats.items()}
