"""Log-probabilities of chosen tokens, in chunks: never a full `(B, T, V)` float32 tensor.

At a 152k vocabulary a `(B, T, V)` float32 `log_softmax` is 0.6 GB per 1,000 tokens, and a trainer keeps it
for its backward pass. Here the model's final hidden states (the final norm's output, what its LM head reads)
go through the LM head a chunk of rows at a time, and only each row's chosen token's log-prob is kept:

    log pi(token) = log_softmax(head(states) / T)[token]          for a chunk of `rows` positions at a time

Bits: `log_softmax` works row by row, and a chunk of all the rows is the model's own head call, so with one
chunk the values and gradients are those of the full `(B, T, V)` computation bit for bit. With more chunks the
head's matrix product runs on fewer rows, which a BLAS may round differently (a last-bit difference, tested to
1e-6); `selected_logprobs` over given logits stays bitwise at any chunk size. With gradients, run each chunk under activation checkpointing (its logits are
recomputed in the backward pass instead of kept), so the memory held for backward is the hidden states, not the
logits. The chunk size is a budget of logit elements (`CHUNK_ELEMENTS`): a small vocabulary (the scratch model's)
fits a whole batch in one chunk.
"""

import torch
from torch.utils.checkpoint import checkpoint

from latentlab.lm.capture import LayerCapture

CHUNK_ELEMENTS = 1 << 24
"""Logits per chunk (64 MiB in float32): rows per chunk = CHUNK_ELEMENTS // vocabulary, at least one."""


def tempered_logprobs(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """log softmax(logits / T) in float32 over the last dimension (T = 0, greedy: T = 1)."""
    return torch.log_softmax(logits.float() / (temperature if temperature > 0 else 1.0), dim=-1)


def chunk_rows(vocab: int, elements: int = CHUNK_ELEMENTS) -> int:
    """Rows of `vocab` logits per chunk under a budget of `elements` logits."""
    return max(1, elements // vocab)


def _select(logits: torch.Tensor, tokens: torch.Tensor, temperature: float) -> torch.Tensor:
    return tempered_logprobs(logits, temperature).gather(-1, tokens[..., None]).squeeze(-1)


def selected_logprobs(
    logits: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0, rows: int | None = None
) -> torch.Tensor:
    """`(..., )` log softmax(logits / T)[token] of `(..., V)` logits, `rows` rows of logits at a time (no float32
    copy of the whole tensor); bitwise equal to the full computation (log_softmax is row by row)."""
    flat_logits, flat_tokens = logits.reshape(-1, logits.shape[-1]), tokens.reshape(-1)
    rows = rows or chunk_rows(logits.shape[-1])
    if flat_logits.shape[0] <= rows:
        return _select(logits, tokens, temperature)
    parts = [
        _select(flat_logits[i : i + rows], flat_tokens[i : i + rows], temperature)
        for i in range(0, flat_logits.shape[0], rows)
    ]
    return torch.cat(parts).view(tokens.shape)


def head_logprobs(
    head: torch.nn.Module,
    states: torch.Tensor,
    tokens: torch.Tensor,
    temperature: float = 1.0,
    rows: int | None = None,
) -> torch.Tensor:
    """`(B, T)` log softmax(head(states) / T)[token] of final hidden states `(B, T, H)`, `rows` positions per chunk.

    One chunk: `head(states)` as the model computes it. Several, with gradients: each chunk is checkpointed.
    """
    vocab = head.weight.shape[0]
    rows = rows or chunk_rows(vocab)
    batch, length = tokens.shape
    if batch * length <= rows:
        return _select(head(states), tokens, temperature)
    flat_states, flat_tokens = states.reshape(batch * length, -1), tokens.reshape(-1)

    def chunk(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return _select(head(s), t, temperature)

    remember = torch.is_grad_enabled() and (states.requires_grad or head.weight.requires_grad)
    parts = []
    for i in range(0, batch * length, rows):
        s, t = flat_states[i : i + rows], flat_tokens[i : i + rows]
        parts.append(checkpoint(chunk, s, t, use_reentrant=False) if remember else chunk(s, t))
    return torch.cat(parts).view(batch, length)


def output_head(model) -> torch.nn.Module | None:
    """The LM head `model`'s logits are exactly `head(final hidden states)` of, or None when they are not
    (a scaled or soft-capped output: Gemma 2, Cohere) and the model's own logits must be used."""
    plain = getattr(model, "module", model)  # a DDP wrapper: its module
    config = getattr(plain, "config", None)
    if getattr(config, "final_logit_softcapping", None) is not None or getattr(config, "logit_scale", None):
        return None
    head = plain.get_output_embeddings() if hasattr(plain, "get_output_embeddings") else None
    return head if isinstance(head, torch.nn.Linear) else None


def forward_logprobs(
    model, tokens: torch.Tensor, keep: int, temperature: float = 1.0, rows: int | None = None, **inputs
) -> torch.Tensor:
    """`(B, T)` log-probs of `tokens` scored by the first T of the last `keep` positions of `model(**inputs)`
    (`keep` = T, or T + 1 when the last position predicts nothing), without the model's `(B, keep, V)` logits:
    the final norm's output is captured and goes through the head in chunks (`head_logprobs`) as the model's
    `logits_to_keep=keep` would have, so one chunk is the model's own arithmetic."""
    head = output_head(model)
    length = tokens.shape[1]
    if head is None:
        logits = model(**inputs, logits_to_keep=keep).logits[:, :length]
        return selected_logprobs(logits, tokens, temperature, rows)
    with LayerCapture(getattr(model, "module", model), [-1]) as capture:
        model(**inputs, logits_to_keep=1)  # the head on one position only: what the model itself computes
        states = capture.states[capture.layers[0]]
    # the rows the model's head call would read (`logits_to_keep=keep`), the last `keep - length` dropped after
    states = states[:, states.shape[1] - keep :]
    if keep == length:
        return head_logprobs(head, states, tokens, temperature, rows)
    # a (B, keep, H) head call as the model's, then [:, :length]: one chunk is the model's own arithmetic
    padded = torch.cat([tokens, tokens.new_zeros(tokens.shape[0], keep - length)], dim=1)
    return head_logprobs(head, states, padded, temperature, rows)[:, :length]
