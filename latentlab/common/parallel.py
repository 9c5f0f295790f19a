"""How a trainable module is spread over torchrun's processes for training: DDP or FSDP2.

    trainable = Trainable(policy, "model", ranks, strategy="fsdp")   # before the optimizer is built
    with trainable.gathered():                                      # sampling: any number of forwards per rank
        rollout = policy.rollout(...)
    with trainable.gradient_pass(sync=last_shard):                  # forward *and* backward inside
        loss.backward()
    state = trainable.full_state_dict()                             # every rank calls it; rank 0 gets the weights

"ddp": every rank holds the whole module; DistributedDataParallel averages the gradients in the backward of a
gradient pass, and its wrapper is in `owner.<attr>` only for those passes, so sampling outside them runs the plain
module without a collective.

"fsdp": torch's FSDP2 (`fully_shard`), each decoder block and then the root sharded in place: a rank stores
1/world of every parameter, its gradient and its optimizer state, and gathers a block's whole parameters just
for that block's forward and backward. Every forward outside `gathered()` is therefore a collective that all
ranks must make alike. FSDP2 also averages the gradients over the ranks (reduce-scatter, then / world), so the
loss scaling of `Shards.weight` holds unchanged for both strategies.

With one process, or nothing to train, nothing is wrapped and every method is plain.

Pitfalls of "fsdp" for a caller: the parameters become DTensors (shards) in place, so the optimizer must be built
after `Trainable` and everything that reads a parameter's values (a state dict, a copy, a deepcopy) must go
through `gathered()` or `full_state_dict()`; `param_dtype` changes the forward's dtype only while sharded (one
process runs as the module is).
"""

from collections.abc import Iterator
from contextlib import ExitStack, contextmanager, nullcontext
from typing import Literal

import torch

from latentlab.common.distributed import Ranks, current_ranks

Strategy = Literal["ddp", "fsdp"]
STRATEGIES: tuple[Strategy, ...] = ("ddp", "fsdp")


class _DDP(torch.nn.parallel.DistributedDataParallel):
    """DDP whose other attributes are the wrapped module's (`get_input_embeddings`, `config`, `residual`...)."""

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "module":  # not set yet (DDP's own __init__ asks)
                raise
            return getattr(super().__getattr__("module"), name)


def _broadcast_from_rank0(module: torch.nn.Module) -> None:
    """Every rank's parameters and buffers made rank 0's, as DDP's constructor does: shards cut from modules
    that differ would silently train a model no rank ever held."""
    import torch.distributed as dist

    with torch.no_grad():
        for tensor in [*module.parameters(), *module.buffers()]:  # a tied parameter is listed once
            dist.broadcast(tensor, src=0)


def _fully_shard(module: torch.nn.Module, param_dtype: torch.dtype | None) -> list[torch.nn.Module]:
    """`module` sharded in place by FSDP2: its decoder blocks, then the root. Returns the sharded modules,
    blocks first, root last.

    The blocks are the submodules whose class the Hugging Face model names in `_no_split_modules` (a block's
    parameters are gathered together for its forward, freed after it); a module without that list (a small
    add-on) is one unit, the root. The root holds what no block does (embeddings, the tied output layer, the
    final norm).
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32 if param_dtype else None)
    block_classes = set(getattr(module, "_no_split_modules", None) or ())
    blocks = [m for m in module.modules() if m is not module and type(m).__name__ in block_classes]
    for block in blocks:
        fully_shard(block, mp_policy=policy)
    fully_shard(module, mp_policy=policy)
    return [*blocks, module]


class Trainable:
    """The module `owner.<attr>` (with trainable parameters) trained under `strategy` across `ranks`.

    `param_dtype` (fsdp only) is FSDP2's mixed precision: parameters gathered and forwards run in that dtype,
    while the shards, the gradients' reduction and the optimizer stay float32.
    """

    def __init__(
        self,
        owner,
        attr: str,
        ranks: Ranks | None = None,
        strategy: Strategy = "ddp",
        param_dtype: torch.dtype | None = None,
    ):
        if strategy not in STRATEGIES:
            raise ValueError(f"unknown parallel strategy {strategy!r} (one of {', '.join(STRATEGIES)})")
        if param_dtype is not None and strategy != "fsdp":
            raise ValueError("param_dtype is FSDP's mixed precision; under DDP the forward passes autocast")
        self.owner, self.attr, self.strategy = owner, attr, strategy
        ranks = ranks or current_ranks()
        module = getattr(owner, attr)
        self.rank = ranks.rank
        self.ddp: _DDP | None = None
        self.sharded: list[torch.nn.Module] = []  # fsdp: the FSDP modules, blocks first, root last
        if ranks.world == 1 or not any(p.requires_grad for p in module.parameters()):
            return  # nothing to average (DDP would refuse a module without gradients)
        if strategy == "ddp":
            device = next(module.parameters()).device
            # forward_sync_buffers=False: buffers (rotary tables) are constants, and a broadcast in every forward
            # would be a collective that the ranks' different numbers of forward calls (sampling) could deadlock
            self.ddp = _DDP(module, device_ids=[device] if device.type == "cuda" else None, forward_sync_buffers=False)
        else:
            _broadcast_from_rank0(module)
            self.sharded = _fully_shard(module, param_dtype)

    @property
    def root(self):
        """The sharded module itself (fsdp), or None."""
        return self.sharded[-1] if self.sharded else None

    @contextmanager
    def gradient_pass(self, sync: bool = True) -> Iterator[None]:
        """A training forward and its backward (both inside the block). `sync=False` accumulates this backward's
        gradients locally (DDP's `no_sync`; FSDP keeps them unsharded); the next synced backward averages the sum.
        Every rank makes the same gradient passes, and every trainable parameter takes part in a synced one."""
        if self.ddp is not None:
            plain = getattr(self.owner, self.attr)
            setattr(self.owner, self.attr, self.ddp)
            try:
                with nullcontext() if sync else self.ddp.no_sync():
                    yield
            finally:
                setattr(self.owner, self.attr, plain)
        elif self.root is not None:
            self.root.set_requires_gradient_sync(sync)
            try:
                yield
            finally:
                self.root.set_requires_gradient_sync(True)
        else:
            yield

    @contextmanager
    def gathered(self) -> Iterator[None]:
        """Whole parameters on every rank for no-grad passes whose number of forward calls differs between ranks
        (autoregressive sampling stops at different lengths): no collective happens inside the block.

        fsdp: every FSDP module is gathered up front and kept gathered through the forwards (a module's
        pre-forward gather is a no-op on gathered parameters, and resharding after forward is off for the block),
        then resharded on leaving. Peak memory is the whole module's, in `param_dtype`. ddp: nothing to do.
        """
        if self.root is None:
            yield
            return
        for module in self.sharded:
            module.unshard()
        self.root.set_reshard_after_forward(False)
        try:
            yield
        finally:
            # the FSDP defaults back: blocks free their gathered parameters after forward, the root keeps them
            # (its backward needs them at once)
            for module in self.sharded[:-1]:
                module.set_reshard_after_forward(True, recurse=False)
            for module in self.sharded:
                module.reshard()

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """The module's whole state on the CPU, on rank 0, under the keys of the plain module's `state_dict()`
        (tied weights under both names); {} on the other ranks. A collective under fsdp: every rank calls it."""
        if self.root is not None:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

            options = StateDictOptions(full_state_dict=True, cpu_offload=True)  # rank 0 only: {} elsewhere
            state = get_model_state_dict(self.root, options=options)
            # a tied weight comes back as one copy per name; tied again, as in the plain module's state dict, so that
            # `save_pretrained` sees the tie and writes it once (else the output layer is saved beside the embedding)
            first: dict[int, str] = {}
            for name, value in self.root.state_dict(keep_vars=True).items():  # the parameters themselves
                alias = first.setdefault(id(value), name)
                if state and alias != name:
                    state[name] = state[alias]
            return state
        if self.rank:
            return {}
        return {name: value.detach().cpu() for name, value in getattr(self.owner, self.attr).state_dict().items()}


class TrainableGroup:
    """Several `Trainable` modules entered together: a policy's model and its add-on (the NLA actor's injection
    map), PPO's value head. One backward then averages every module's gradients, each by its own DDP reducer or
    FSDP reduce-scatter."""

    def __init__(self, *trainables: Trainable):
        self.trainables = trainables

    @contextmanager
    def gradient_pass(self, sync: bool = True) -> Iterator[None]:
        with ExitStack() as stack:
            for one in self.trainables:
                stack.enter_context(one.gradient_pass(sync))
            yield

    @contextmanager
    def gathered(self) -> Iterator[None]:
        with ExitStack() as stack:
            for one in self.trainables:
                stack.enter_context(one.gathered())
            yield
