"""Training with low-precision weights: fp32 master copies for the optimizer, activation checkpointing, the dtype
param's parser.

bf16 weights halve the memory of the weights and of every activation and run bf16 matmuls without autocast, but
AdamW cannot step them in place: an update smaller than half a bf16 ulp (2**-8 relative) rounds away, so small
learning rates or late, small updates are lost. `MasterWeights` keeps an fp32 copy of each bf16 parameter that
AdamW steps, and rounds it back into the model after each step (mixed-precision training, Micikevicius et al.,
2018). fp32 parameters (say a value head, or LoRA adapters over a bf16 base) are stepped as they are.
"""

import torch

WEIGHT_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}

CHUNK_BYTES = 2**28
"""fp32 gradient bytes upcast at a time in `MasterWeights.step`: the master gradients exist one chunk at a time, so
they never add a full fp32 copy of the gradients to the peak (a tensor larger than this is a chunk of its own)."""


def weight_dtype(name: str) -> torch.dtype:
    """The torch dtype of a `model.dtype` param value ('float32' | 'bfloat16')."""
    if name not in WEIGHT_DTYPES:
        raise ValueError(f"weight dtype must be one of {tuple(WEIGHT_DTYPES)}, got {name!r}")
    return WEIGHT_DTYPES[name]


class MasterWeights:
    """AdamW (or any `inner` optimizer) over fp32 master copies of low-precision parameters.

    `inner` is built over `masters` (what `master_params` returns: the fp32 parameters themselves, and a detached
    fp32 copy of each other one), so torch's LR schedulers wrap `inner` and see its param_groups, which this
    wrapper also exposes. `step()` upcasts each model gradient into its master, steps the masters (a chunk of
    `chunk_bytes` at a time: AdamW skips a parameter without a gradient), and copies the masters back, rounded,
    into the model's parameters. The model's gradients are left in place (as after a plain optimizer's step), so
    `clip_grad_norm_` over the model's parameters before `step()` clips what the masters receive.
    """

    def __init__(self, params: list[torch.nn.Parameter], masters: list[torch.Tensor], inner, chunk_bytes=CHUNK_BYTES):
        self.params, self.masters, self.inner = params, masters, inner
        self.chunks: list[list[int]] = [[]]
        size = 0
        for index, master in enumerate(masters):
            nbytes = master.numel() * master.element_size()
            if self.chunks[-1] and size + nbytes > chunk_bytes:
                self.chunks.append([])
                size = 0
            self.chunks[-1].append(index)
            size += nbytes

    @staticmethod
    def master_params(params: list[torch.nn.Parameter]) -> list[torch.Tensor]:
        """The tensors the inner optimizer steps: fp32 parameters as they are, others as a fp32 copy."""
        return [
            p if p.dtype == torch.float32 else p.detach().float().requires_grad_(True)  # clone-free for fp32 only
            for p in params
        ]

    @property
    def param_groups(self):
        return self.inner.param_groups

    @property
    def state(self):
        return self.inner.state

    def zero_grad(self, set_to_none: bool = True) -> None:
        """The model's gradients (the masters hold none between steps)."""
        for p in self.params:
            if p.grad is None:
                continue
            if set_to_none:
                p.grad = None
            else:
                p.grad.zero_()

    @torch.no_grad()
    def step(self) -> None:
        grads = [p.grad for p in self.params]
        for master in self.masters:  # fp32 params are their own masters: hidden until their chunk
            master.grad = None
        for chunk in self.chunks:
            for i in chunk:
                if grads[i] is not None:
                    self.masters[i].grad = grads[i] if self.masters[i] is self.params[i] else grads[i].float()
            self.inner.step()
            for i in chunk:
                self.masters[i].grad = None
                if self.masters[i] is not self.params[i]:
                    self.params[i].copy_(self.masters[i])
        for p, grad in zip(self.params, grads, strict=True):
            p.grad = grad

    def state_dict(self) -> dict:
        """The inner optimizer's state and the masters (the model's rounded weights cannot restore them)."""
        return {"inner": self.inner.state_dict(), "masters": [m.detach().clone() for m in self.masters]}

    def load_state_dict(self, state: dict) -> None:
        self.inner.load_state_dict(state["inner"])
        with torch.no_grad():
            for master, saved, param in zip(self.masters, state["masters"], self.params, strict=True):
                master.copy_(saved)
                if master is not param:
                    param.copy_(master)


def enable_gradient_checkpointing(model) -> None:
    """HF activation checkpointing of every decoder block, non-reentrant: a block keeps only its input in the
    forward and recomputes the rest in the backward (about one extra forward for far less activation memory).

    `model` may be a PreTrainedModel or a peft PeftModel (whose base model is enabled). Non-reentrant
    checkpointing needs no input that requires grad, so it works with frozen embeddings (LoRA) as it is; HF
    still registers its input-requires-grad hook on the embeddings, which changes no gradient of a parameter.

    Checkpointed blocks run without a KV cache in train mode (HF drops `past_key_values` there: a replayed
    block would append to the cache twice), so a train-mode pass that continues from a cache sees no prefix.
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    base.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
