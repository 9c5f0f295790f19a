"""The one sampler of the project, and the log-probabilities of what it sampled.

Every stage that generates (label, grpo, inject, nla_rl, surgery, evaluate) goes through `sample`:
batched, left-padded prompts, a KV cache (each step feeds one new token), temperature / top-p,
end-of-sequence handling, and an optional embedding prefix so that injected vectors (a virtual
token, an activation at <INJECT>) are just rows of `inputs_embeds`.

`completion_logprobs` recomputes, with gradients, log pi(token) for exactly the sampled tokens in
one teacher-forced pass. Alignment: the logits at position t predict the token at t+1, so the
logits of the last prompt position score the first completion token.
"""

from collections.abc import Callable
from dataclasses import dataclass

import torch
from pydantic import Field

from latentlab.common.config import Config
from latentlab.lm.capture import LayerCapture
from latentlab.lm.padding import pad_sequences


class SamplingConfig(Config):
    max_new_tokens: int = Field(gt=0)
    """Longest completion, in tokens (the end-of-sequence token included)."""
    temperature: float = Field(1.0, ge=0)
    """Softmax temperature; 0 means greedy decoding."""
    top_p: float = Field(1.0, gt=0, le=1)
    """Nucleus sampling: sample among the most likely tokens holding this much probability."""
    logit_noise: float = Field(0.0, ge=0)
    """Exploration noise: std of Gaussian noise added to the logits when choosing a token (not in log-probs)."""
    stop_at_eos: bool = True
    """False: end-of-sequence ends no row, every row gets exactly max_new_tokens tokens (an end-of-sequence
    token is then an ordinary token), as `generate(eos_token_id=None)` and fixed-length pipelines do."""


@dataclass
class Completions:
    ids: torch.Tensor  # (B, T) sampled tokens, pad after end-of-sequence
    mask: torch.Tensor  # (B, T) bool: generated tokens up to and including end-of-sequence
    logprobs: torch.Tensor  # (B, T) log pi(token) under softmax(logits / temperature); 0 where masked

    @property
    def lengths(self) -> torch.Tensor:
        return self.mask.sum(1)


def positions_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids that skip left padding: the first real token of every row is at position 0."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def tokenize_prompts(tokenizer, prompts: list[str], device) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded (ids, mask): every prompt ends at the last column, where generation starts."""
    if not prompts:
        raise ValueError("no prompts to tokenize")
    ids = tokenizer(prompts, add_special_tokens=False)["input_ids"]
    for row, x in enumerate(ids):
        if not x:
            raise ValueError(f"prompt {row} tokenizes to nothing: {prompts[row]!r}")
    ids, mask = pad_sequences(ids, tokenizer.pad_token_id, left=True)
    return ids.to(device), mask.to(device)


def _tempered_logprobs(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    return torch.log_softmax(logits.float() / (temperature if temperature > 0 else 1.0), dim=-1)


def _nucleus(logprobs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Set to -inf every token outside the smallest set whose probability reaches top_p."""
    sorted_lp, order = logprobs.sort(dim=-1, descending=True)
    mass_before = sorted_lp.exp().cumsum(-1) - sorted_lp.exp()
    sorted_lp = sorted_lp.masked_fill(mass_before >= top_p, float("-inf"))
    return torch.full_like(logprobs, float("-inf")).scatter(-1, order, sorted_lp)


def choose_tokens(logits: torch.Tensor, cfg: SamplingConfig, generator: torch.Generator | None):
    """Pick one token per row; returns (tokens, their log-prob under softmax(logits / T))."""
    logprobs = _tempered_logprobs(logits, cfg.temperature)
    if cfg.temperature == 0:
        tokens = logprobs.argmax(-1)
    else:
        scores = _nucleus(logprobs, cfg.top_p) if cfg.top_p < 1 else logprobs
        if cfg.logit_noise > 0:
            noise = torch.randn(scores.shape, generator=generator, device=scores.device)
            scores = scores + cfg.logit_noise * noise
        tokens = torch.multinomial(torch.softmax(scores, -1), 1, generator=generator).squeeze(-1)
    return tokens, logprobs.gather(-1, tokens[:, None]).squeeze(-1)


@torch.no_grad()
def sample(
    model,
    inputs_embeds: torch.Tensor,
    attention_mask: torch.Tensor,
    cfg: SamplingConfig,
    eos_id: int,
    pad_id: int,
    generator: torch.Generator | None = None,
    *,
    past_key_values=None,
    capture: LayerCapture | None = None,
    on_token: Callable[[int, torch.Tensor, torch.Tensor], None] | None = None,
) -> Completions:
    """Continue each left-padded prefix of embeddings `(B, P, H)` for up to `cfg.max_new_tokens`.

    The prefix is encoded once; every later step feeds only the newest token against the KV cache.
    Rows that have emitted end-of-sequence keep running (cheaper than re-packing the batch) but
    their further tokens are replaced by padding and masked out; the loop stops when all are done.
    With `cfg.stop_at_eos` false no row is ever done: every row gets `max_new_tokens` tokens.

    past_key_values: a cache that already holds the first columns of `attention_mask`; then
        `inputs_embeds` are only the new positions that continue it (e.g. a virtual token).
    capture, on_token: with an active `LayerCapture`, `on_token(t, states, alive)` receives, for
        generated token t, the chosen layers' states `(B, L, H)` at the position that predicted it
        (the last prefix position for t = 0) and which rows were still generating.
    """
    if on_token is not None and capture is None:
        raise ValueError("on_token needs an active LayerCapture to read hidden states from")
    batch, new = inputs_embeds.shape[:2]
    device = inputs_embeds.device
    positions = positions_from_mask(attention_mask)[:, -new:]
    out = model(
        inputs_embeds=inputs_embeds,
        attention_mask=attention_mask,
        position_ids=positions,
        past_key_values=past_key_values,
        use_cache=True,
        logits_to_keep=1,
    )
    next_position = positions[:, -1] + 1
    ids = torch.full((batch, cfg.max_new_tokens), pad_id, dtype=torch.long, device=device)
    logprobs = torch.zeros((batch, cfg.max_new_tokens), device=device)
    mask = torch.zeros((batch, cfg.max_new_tokens), dtype=torch.bool, device=device)
    finished = torch.zeros(batch, dtype=torch.bool, device=device)
    steps = 0
    for t in range(cfg.max_new_tokens):
        tokens, token_logprobs = choose_tokens(out.logits[:, -1], cfg, generator)
        alive = ~finished
        ids[:, t] = torch.where(alive, tokens, pad_id)
        logprobs[:, t] = torch.where(alive, token_logprobs, 0.0)
        mask[:, t] = alive
        if on_token is not None:
            on_token(t, capture.last_position(), alive)
        if cfg.stop_at_eos:
            finished |= tokens == eos_id
        steps = t + 1
        if finished.all() or t == cfg.max_new_tokens - 1:
            break
        attention_mask = torch.cat([attention_mask, attention_mask.new_ones((batch, 1))], dim=1)
        out = model(
            input_ids=ids[:, t : t + 1],
            attention_mask=attention_mask,
            position_ids=next_position[:, None],
            past_key_values=out.past_key_values,
            use_cache=True,
            logits_to_keep=1,
        )
        next_position = next_position + 1
    return Completions(ids[:, :steps], mask[:, :steps], logprobs[:, :steps])


def completion_logprobs(
    model,
    prefix_embeds: torch.Tensor,
    prefix_mask: torch.Tensor,
    completions: Completions,
    temperature: float = 1.0,
) -> torch.Tensor:
    """log pi(token) of every sampled completion token `(B, T)`, with gradients, in one forward pass.

    The logits at position t predict token t+1: the prefix's last position scores completion token 0,
    completion position j-1 scores token j. Positions after end-of-sequence are masked (zero).
    """
    prefix_len, length = prefix_embeds.shape[1], completions.ids.shape[1]
    embeds = torch.cat([prefix_embeds, model.get_input_embeddings()(completions.ids)], dim=1)
    mask = torch.cat([prefix_mask, completions.mask.long()], dim=1)
    # keep the logits of positions prefix_len-1 .. prefix_len+length-1; the last one predicts nothing
    logits = model(
        inputs_embeds=embeds, attention_mask=mask, position_ids=positions_from_mask(mask), logits_to_keep=length + 1
    ).logits[:, :-1]
    assert logits.shape[1] == length and prefix_len > 0
    logprobs = _tempered_logprobs(logits, temperature).gather(-1, completions.ids[..., None]).squeeze(-1)
    return logprobs * completions.mask
