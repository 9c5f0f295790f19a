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

"fsdp": torch's FSDP2 (`fully_shard`), each decoder block sharded in place: a rank stores 1/world of every
block's parameters, gradients and optimizer state, and gathers a block's whole parameters just for that block's
forward and backward. The rest of the model (embeddings, tied output layer, final norm) stays whole on every rank,
its gradients averaged like DDP's (`_fully_shard` says why). Every forward outside `gathered()` is therefore a
collective that all ranks must make alike. FSDP2 averages the gradients over the ranks (reduce-scatter, then
/ world) as DDP does, so the execution layer's normalisation (latentlab/common/execution.py) holds for both.

With one process, or nothing to train, nothing is wrapped and every method is plain.

Pitfalls of "fsdp" for a caller: the parameters become DTensors (shards) in place, so the optimizer must be built
after `Trainable` and everything that reads a parameter's values (a state dict, a copy, a deepcopy) must go
through `gathered()` or `full_state_dict()`; `param_dtype` changes the forward's dtype only while sharded (one
process runs as the module is).
"""

import functools
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
    """`module`'s decoder blocks (and untied embeddings) sharded in place by FSDP2; returns them (none: nothing
    is sharded).

    The blocks are the submodules whose class a Hugging Face model inside `module` names in `_no_split_modules`
    (Llama, Qwen2/3, GPT-2 all do). Each block's parameters are gathered for its forward and backward and freed
    after each (explicit `reshard_after_forward`: every block is a root of its own, and FSDP2 keeps a root
    gathered by default). Untied input and output embeddings (Llama 3's) are units of their own: FSDP2 gathers a
    unit in its own forward hook, so an embedding called outside the model's forward (a policy's injected
    prefix) works. What no unit holds (a tied embedding, which two units cannot share, the final norm, a small
    add-on such as an injector or a value head; FSDP2 refuses scalar parameters, a gate) stays whole on every
    rank, its gradients averaged by `Trainable` at the synced backward, as DDP would.
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32 if param_dtype else None)
    block_classes = {name for m in module.modules() for name in getattr(m, "_no_split_modules", None) or ()}
    units = [m for m in module.modules() if m is not module and type(m).__name__ in block_classes]
    for lm in (m for m in module.modules() if hasattr(m, "_no_split_modules") and hasattr(m, "get_input_embeddings")):
        embedding, head = lm.get_input_embeddings(), lm.get_output_embeddings()
        if head is not None and head.weight is not embedding.weight:  # untied (Llama 3): each a unit of its own,
            units += [embedding, head]  # gathered by its own hooks wherever it is called (a tied pair stays whole)
        break
    for unit in units:
        fully_shard(unit, mp_policy=policy, reshard_after_forward=True)
    return units


def _given_state_dict(state: dict, *args, destination=None, prefix: str = "", keep_vars: bool = False) -> dict:
    """`nn.Module.state_dict`'s answer, from a gathered `state` (see `Trainable.whole_state`)."""
    out = {} if destination is None else destination
    out.update({prefix + key: value for key, value in state.items()})
    return out


def _average_gradients(params: list[torch.nn.Parameter], world: int) -> None:
    """Every rank's gradients of `params` replaced by their mean over the ranks (one all-reduce of one flat buffer;
    a parameter without a gradient on this rank counts as a zero one, so every rank sends the same layout)."""
    import torch.distributed as dist
    from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    grads = [p.grad for p in params]
    flat = _flatten_dense_tensors(grads)
    dist.all_reduce(flat)
    flat /= world
    for grad, mean in zip(grads, _unflatten_dense_tensors(flat, grads), strict=True):
        grad.copy_(mean)


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
        self.rank, self.world = ranks.rank, ranks.world
        self.ddp: _DDP | None = None
        self.sharded: list[torch.nn.Module] = []  # fsdp: the FSDP modules (the decoder blocks)
        self.replicated: list[torch.nn.Parameter] = []  # fsdp: trainable parameters outside every FSDP module
        if ranks.world == 1 or not any(p.requires_grad for p in module.parameters()):
            return  # nothing to average (DDP would refuse a module without gradients)
        if strategy == "ddp":
            device = next(module.parameters()).device
            # forward_sync_buffers=False: buffers (rotary tables) are constants, and a broadcast in every forward
            # would be a collective that the ranks' different numbers of forward calls (sampling) could deadlock
            # gradient_as_bucket_view: the gradients live in DDP's all-reduce buckets, not in a second copy
            ids = [device] if device.type == "cuda" else None
            self.ddp = _DDP(module, device_ids=ids, forward_sync_buffers=False, gradient_as_bucket_view=True)
        else:
            _broadcast_from_rank0(module)
            self.sharded = _fully_shard(module, param_dtype)
            inside = {id(p) for sharded in self.sharded for p in sharded.parameters()}
            self.replicated = [p for p in module.parameters() if p.requires_grad and id(p) not in inside]

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
        elif self.sharded or self.replicated:
            for module in self.sharded:
                module.set_requires_gradient_sync(sync, recurse=False)
            try:
                yield
                if sync and self.replicated:  # the backward is done: the whole-on-every-rank part averaged
                    _average_gradients(self.replicated, self.world)
            finally:
                for module in self.sharded:
                    module.set_requires_gradient_sync(True, recurse=False)
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
        if not self.sharded:
            yield
            return
        for module in self.sharded:
            module.unshard()
            module.set_reshard_after_forward(False, recurse=False)
        try:
            yield
        finally:
            for module in self.sharded:  # blocks free their gathered parameters after forward again
                module.set_reshard_after_forward(True, recurse=False)
                module.reshard()

    @contextmanager
    def whole_state(self) -> Iterator[None]:
        """For saving: under fsdp every rank gathers the module's whole state (`full_state_dict`, a collective), and
        inside the block rank 0's module and each of its submodules answer `state_dict()` with their part of it, so
        any saver (HF's save_pretrained, peft's, a safetensors file of `state_dict()`) writes the plain module's
        weights. The weights must not change inside the block. Nothing to do unsharded."""
        if not self.sharded:
            yield
            return
        state = self.full_state_dict()
        module = getattr(self.owner, self.attr)
        patched = []
        if state:  # rank 0
            for name, submodule in module.named_modules():
                head = f"{name}." if name else ""
                own = {key[len(head) :]: value for key, value in state.items() if key.startswith(head)}
                submodule.state_dict = functools.partial(_given_state_dict, own)  # shadows the method
                patched.append(submodule)
        try:
            yield
        finally:
            for submodule in patched:
                del submodule.state_dict

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """The module's whole state on the CPU, on rank 0, under the keys of the plain module's `state_dict()`
        (tied weights under both names); {} on the other ranks. A collective under fsdp: every rank calls it."""
        if self.sharded:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

            options = StateDictOptions(full_state_dict=True, cpu_offload=True)  # rank 0 only: {} elsewhere
            module = getattr(self.owner, self.attr)
            state = get_model_state_dict(module, options=options)
            # a tied weight comes back as one copy per name; tied again, as in the plain module's state dict, so that
            # `save_pretrained` sees the tie and writes it once (else the output layer is saved beside the embedding)
            first: dict[int, str] = {}
            for name, value in module.state_dict(keep_vars=True).items():  # the parameters themselves
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
    def _each(self, enter) -> Iterator[None]:
        with ExitStack() as stack:
            for one in self.trainables:
                stack.enter_context(enter(one))
            yield

    def gradient_pass(self, sync: bool = True):
        return self._each(lambda one: one.gradient_pass(sync))

    def gathered(self):
        return self._each(Trainable.gathered)

    def whole_state(self):
        return self._each(Trainable.whole_state)


def local_rows(tensor: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(the rows of `tensor` this rank holds, the index of the first of them in the whole tensor).

    A plain tensor is whole on every rank: (itself, 0). An FSDP2 shard (a DTensor placed Shard(0) on a 1-D mesh, as
    `fully_shard` leaves every parameter of a unit) is cut as torch.chunk cuts: rank r of W holds rows
    [r * ceil(n / W), min(n, (r + 1) * ceil(n / W))) (possibly none), and its local tensor is a view of the storage
    FSDP gathers the whole parameter from, so an in-place edit of it is an edit of those rows of the whole tensor
    (seen by the next forward, which gathers anew). Called with gradients off, the view is the shard itself."""
    from torch.distributed.tensor import DTensor, Shard

    if not isinstance(tensor, DTensor):
        return tensor, 0
    mesh, placements = tensor.device_mesh, tuple(tensor.placements)
    if mesh.ndim != 1 or placements != (Shard(0),):
        raise ValueError(
            f"a sharded tensor placed {placements} on a {mesh.ndim}-D mesh: only FSDP2's Shard(0) is known"
        )
    rows, world = tensor.shape[0], mesh.size()
    chunk = -(-rows // world) if rows else 0
    first = min(rows, mesh.get_local_rank() * chunk)
    with torch.no_grad():
        local = tensor.to_local()
    if local.shape[0] != min(rows, first + chunk) - first:
        raise ValueError(
            f"a shard of {local.shape[0]} rows where Shard(0) of {rows} rows over {world} ranks has {first}"
        )
    return local, first


def whole_sums(partials: list[torch.Tensor], tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Sums over whole tensors from sums over their local rows: `partials[i]` sums something over `local_rows(
    tensors[i])`; where `tensors[i]` is a shard it is all-reduced over the shard's ranks (one all-reduce for them
    all, a collective every rank of the mesh makes alike), where it is whole it is returned as it is (every rank
    holds all of it). Without a shard nothing happens: the partials themselves come back."""
    from torch.distributed.tensor import DTensor

    sharded = [i for i, tensor in enumerate(tensors) if isinstance(tensor, DTensor)]
    if not sharded:
        return list(partials)
    import torch.distributed as dist

    mesh = tensors[sharded[0]].device_mesh
    if any(tensors[i].device_mesh != mesh for i in sharded):
        raise ValueError("sums over shards of different device meshes")
    stacked = torch.stack([partials[i] for i in sharded])
    dist.all_reduce(stacked, group=mesh.get_group())
    out = list(partials)
    for slot, i in enumerate(sharded):
        out[i] = stacked[slot]
    return out


def clip_grad_norm(params: list[torch.nn.Parameter], max_norm: float) -> torch.Tensor:
    """torch's `clip_grad_norm_` (the global L2 norm of every gradient; each scaled by min(1, max_norm / norm)),
    also where some parameters are FSDP shards (DTensors) and others whole tensors, which torch's own refuses to
    mix. Returns the norm before clipping. Without a shard it is torch's own, bit for bit."""
    from torch.distributed.tensor import DTensor

    grads = [p.grad for p in params if p.grad is not None]
    sharded = [g for g in grads if isinstance(g, DTensor)]
    if not sharded:
        return torch.nn.utils.clip_grad_norm_(params, max_norm)
    whole = [g for g in grads if not isinstance(g, DTensor)]
    norms = [torch.nn.utils.get_total_norm(sharded).full_tensor()]  # each rank's shards' squares all-reduced
    if whole:
        norms.append(torch.nn.utils.get_total_norm(whole).to(norms[0].device))
    total = torch.linalg.vector_norm(torch.stack(norms))
    scale = max_norm / (total.item() + 1e-6)
    if scale < 1.0:
        for grad in grads:
            grad.mul_(scale)
    return total
