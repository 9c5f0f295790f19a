"""Capture chosen layers' hidden states with forward hooks, indexed as `output_hidden_states` is.

Index 0 is the input of the first block (the embeddings), index i < L the input of block i, and
index L (or -1) the output of the final norm, exactly the tuple Hugging Face returns. Hooks keep
only the layers asked for, so nothing forces every layer of every step to be materialised.
"""

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn

LAYOUTS = (("layers", "norm"), ("h", "ln_f"), ("layers", "final_layer_norm"))
"""(blocks, final norm) attribute names of the decoder bodies supported: Llama/Qwen/Mistral/Phi-3, GPT-2/Falcon/BLOOM,
GPT-NeoX."""


def decoder_layout(model) -> tuple[nn.Module, str, str]:
    """(the decoder body, the name of its blocks' ModuleList, the name of its final norm) of a Hugging Face
    causal LM or of its decoder body itself (`LlamaModel`, `GPT2Model`, ...)."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else model
    for blocks_name, norm_name in LAYOUTS:
        blocks, norm = getattr(decoder, blocks_name, None), getattr(decoder, norm_name, None)
        if isinstance(blocks, nn.ModuleList) and norm is not None:
            return decoder, blocks_name, norm_name
    raise TypeError(f"cannot find the decoder blocks of {type(model).__name__}")


def decoder_blocks(model) -> tuple[nn.ModuleList, nn.Module]:
    """(the decoder blocks, the final norm) of a Hugging Face causal LM."""
    decoder, blocks_name, norm_name = decoder_layout(model)
    return getattr(decoder, blocks_name), getattr(decoder, norm_name)


def resolve_layers(layers: Sequence[int], num_blocks: int) -> list[int]:
    """Map indices (negative allowed) into 0..num_blocks; an index out of range is an error naming it."""
    count = num_blocks + 1
    resolved = []
    for index in layers:
        if not -count <= index < count:
            raise IndexError(
                f"layer {index} is out of range: this model has hidden states 0..{num_blocks} (or -{count}..-1)"
            )
        resolved.append(index % count)
    return resolved


class LayerCapture:
    """Context manager: while active, `states` holds the latest forward pass's chosen layers.

    with LayerCapture(model, [-1]) as capture:
        model(input_ids=ids)
        capture.stacked()        # (B, T, len(layers), H)
    """

    def __init__(self, model, layers: Sequence[int]):
        blocks, self._norm = decoder_blocks(model)
        self._blocks = blocks
        self.layers = resolve_layers(layers, len(blocks))
        self.states: dict[int, torch.Tensor] = {}
        self._handles: list = []

    def _keep(self, index: int):
        def pre_hook(module, args, kwargs):
            self.states[index] = args[0] if args else kwargs["hidden_states"]

        def post_hook(module, args, output):
            self.states[index] = output[0] if isinstance(output, tuple) else output

        return pre_hook, post_hook

    def __enter__(self) -> "LayerCapture":
        for index in set(self.layers):
            pre_hook, post_hook = self._keep(index)
            if index < len(self._blocks):  # input of block `index`
                self._handles.append(self._blocks[index].register_forward_pre_hook(pre_hook, with_kwargs=True))
            else:  # after the final norm
                self._handles.append(self._norm.register_forward_hook(post_hook))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self.states.clear()

    def stacked(self) -> torch.Tensor:
        """The latest pass's states, `(B, T, L, H)` with layers in the order asked for."""
        return torch.stack([self.states[i] for i in self.layers], dim=2)

    def last_position(self) -> torch.Tensor:
        """`(B, L, H)`: the states of the last position of the latest pass."""
        return torch.stack([self.states[i][:, -1] for i in self.layers], dim=1)


@contextmanager
def edit_block_input(
    model, block: int, edit: Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor | None]
) -> Iterator[None]:
    """While active, the input hidden states `(B, T, H)` of decoder block `block` (layer `block` as
    output_hidden_states numbers it) pass through `edit(states, position_ids)`, which returns new states
    or None (unchanged); `position_ids` `(B, T)` is the pass's, or None when the caller gave none.

    A forward pre-hook, removed on exit (also on an exception). What the edit writes flows into that
    block and every later one, and into the KV cache of the edited positions from that block on.
    """
    blocks, _ = decoder_blocks(model)

    def pre_hook(module, args, kwargs):
        states = args[0] if args else kwargs["hidden_states"]
        edited = edit(states, kwargs.get("position_ids"))
        if edited is None:
            return None
        if args:
            return (edited, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": edited}

    handle = blocks[block].register_forward_pre_hook(pre_hook, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


class _Enough(Exception):
    """Raised by a hook once every state asked for is held: the blocks after it are not run."""


@torch.no_grad()
def body_states(model, layers: Sequence[int], input_ids: torch.Tensor, attention_mask: torch.Tensor) -> list:
    """The states `(B, T, H)` at `layers` (numbered as output_hidden_states, negative allowed) of one pass of
    the decoder body alone: never the LM head (no logits), and no block after the highest layer asked for
    is run (layer 0 alone runs the embedding only). Each equals `model(..., output_hidden_states=True)`'s
    `hidden_states[layer]`."""
    decoder, _, _ = decoder_layout(model)
    blocks, _ = decoder_blocks(model)
    last = max(resolve_layers(layers, len(blocks)))
    with LayerCapture(model, layers) as capture:
        handle = None
        if last < len(blocks):  # stop at the input of block `last`, once LayerCapture's pre-hook has kept it

            def enough(module, args, kwargs):
                raise _Enough

            handle = blocks[last].register_forward_pre_hook(enough, with_kwargs=True)
        try:
            decoder(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        except _Enough:
            pass
        finally:
            if handle is not None:
                handle.remove()
        return [capture.states[i] for i in capture.layers]
