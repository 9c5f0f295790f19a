"""The one sampler of the project, and the log-probabilities of what it sampled.

Every stage that generates (label, grpo, inject, nla_rl, surgery, evaluate) goes through `sample`:
batched, left-padded prompts, a KV cache (each step feeds one new token), temperature / top-p,
end-of-sequence handling, and an optional embedding prefix so that injected vectors (a virtual
token, an activation at <INJECT>) are just rows of `inputs_embeds`.

`completion_logprobs` recomputes, with gradients, log pi(token) for exactly the sampled tokens in
one teacher-forced pass. Alignment: the logits at position t predict the token at t+1, so the
logits of the last prompt position score the first completion token.

Groups (GRPO samples G completions of every prompt): with `group_size=G` both functions take the P
distinct prefixes, run them once, and expand the KV cache of the prefix to the P * G rows (row
p * G + g is completion g of prompt p) that the completions continue. The work on the prompt drops
G-fold; what each completion attends to is the same keys and values, so the result is the unshared
one up to float rounding. With gradients, the expanded cache is part of the graph
(`repeat_interleave` sums the G rows' gradients back onto their prefix row).

Exploration noise (`logit_noise` > 0) draws each token from q = softmax(logits / T + noise), and top-p < 1 from
q = pi renormalised on the nucleus, not from pi: the sampler then also returns log q of each drawn token (q given
the noise it drew), which a trainer uses as the
behaviour policy of an importance ratio pi / q. Diverged weights (NaN or inf logits) raise
`NonFiniteLogitsError` at the end of the generation, never an error (or a CUDA device-side assert) inside
torch.multinomial, and without a host sync per token.
"""

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from pydantic import Field

from latentlab.common.config import Config
from latentlab.common.errors import NonFiniteLogitsError
from latentlab.lm.capture import LayerCapture
from latentlab.lm.logprobs import forward_logprobs, selected_logprobs, tempered_logprobs
from latentlab.lm.padding import pad_sequences
from latentlab.lm.prompt_format import RAW, PromptFormat


class SamplingConfig(Config):
    max_new_tokens: int = Field(gt=0)
    """Longest completion, in tokens (the end-of-sequence token included)."""
    temperature: float = Field(1.0, ge=0)
    """Softmax temperature; 0 means greedy decoding."""
    top_p: float = Field(1.0, gt=0, le=1)
    """Nucleus sampling: sample among the most likely tokens holding this much probability. Below 1 tokens come
    from q = pi renormalised on the nucleus, not pi: `behaviour_logprobs` hold log q (the log of the renormalised
    probability) for an importance ratio pi / q, as with `logit_noise`. 1: nothing extra is computed."""
    logit_noise: float = Field(0.0, ge=0)
    """Exploration noise: std of Gaussian noise added to the tempered logits when choosing a token. Tokens then
    come from q = softmax(logits / T + noise), not pi: `logprobs` stay log pi, `behaviour_logprobs` hold log q
    (given the drawn noise) for an importance ratio pi / q. 0: no noise, nothing extra drawn from the generator."""
    stop_at_eos: bool = True
    """False: end-of-sequence ends no row, every row gets exactly max_new_tokens tokens (an end-of-sequence
    token is then an ordinary token), as `generate(eos_token_id=None)` and fixed-length pipelines do."""


@dataclass
class Completions:
    ids: torch.Tensor  # (B, T) sampled tokens, pad after end-of-sequence
    mask: torch.Tensor  # (B, T) bool: generated tokens up to and including end-of-sequence
    logprobs: torch.Tensor  # (B, T) log pi(token) under softmax(logits / temperature); 0 where masked
    # (B, T) log q(token) of the distribution the token was drawn from when it is not pi (top_p < 1: pi
    # renormalised on the nucleus; logit_noise > 0: q = softmax(logits / T + the drawn noise), top-p applied
    # first); 0 where masked. None: drawn from pi (or greedy)
    behaviour_logprobs: torch.Tensor | None = None

    @property
    def lengths(self) -> torch.Tensor:
        return self.mask.sum(1)


def positions_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids that skip left padding: the first real token of every row is at position 0."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def tokenize_prompts(
    tokenizer, prompts: list[str], device, prompt_format: PromptFormat = RAW
) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded (ids, mask) of the prompts in `prompt_format`: every prompt ends at the last column, where
    generation starts."""
    if not prompts:
        raise ValueError("no prompts to tokenize")
    ids = prompt_format.encode(tokenizer, prompts)
    for row, x in enumerate(ids):
        if not x:
            raise ValueError(f"prompt {row} tokenizes to nothing: {prompts[row]!r}")
    ids, mask = pad_sequences(ids, tokenizer.pad_token_id, left=True)
    return ids.to(device), mask.to(device)


def _nucleus(logprobs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Set to -inf every token outside the smallest set whose probability reaches top_p."""
    sorted_lp, order = logprobs.sort(dim=-1, descending=True)
    mass_before = sorted_lp.exp().cumsum(-1) - sorted_lp.exp()
    sorted_lp = sorted_lp.masked_fill(mass_before >= top_p, float("-inf"))
    return torch.full_like(logprobs, float("-inf")).scatter(-1, order, sorted_lp)


def _diverged() -> NonFiniteLogitsError:
    return NonFiniteLogitsError(
        "the model's logits are not finite (NaN or inf) while sampling: its weights have diverged "
        "(lower the learning rate, or resume from an earlier checkpoint) or its inputs are broken"
    )


@contextmanager
def naming_step(step: int) -> Iterator[None]:
    """A trainer's sampling: a `NonFiniteLogitsError` raised inside names the training step it happened at."""
    try:
        yield
    except NonFiniteLogitsError as error:
        raise NonFiniteLogitsError(f"step {step}: {error}") from error


def choose_tokens(
    logits: torch.Tensor, cfg: SamplingConfig, generator: torch.Generator | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Pick one token per row; returns (tokens, their log-prob under pi = softmax(logits / T), their log-prob
    under the distribution q they were drawn from when that is not pi (top_p < 1: the renormalised nucleus;
    logit_noise > 0: given the drawn noise), else None).

    Diverged weights: NaN or +inf logits make a row's log-probs NaN (softmax then NaN everywhere in the row).
    Such a row draws uniformly instead of reaching torch.multinomial, whose input check is a device-side assert
    on CUDA in recent torch (it kills the CUDA context); its recorded log-prob is NaN or -inf, which `sample`
    turns into `NonFiniteLogitsError` with one check per generation, not a host sync per token."""
    logprobs = tempered_logprobs(logits, cfg.temperature)
    behaviour = None
    if cfg.temperature == 0:
        tokens = logprobs.argmax(-1)
    else:
        scores = _nucleus(logprobs, cfg.top_p) if cfg.top_p < 1 else logprobs
        if cfg.logit_noise > 0:
            noise = torch.randn(scores.shape, generator=generator, device=scores.device)
            scores = scores + cfg.logit_noise * noise  # q = softmax(scores), given this noise
        probs = torch.softmax(scores, -1).nan_to_num(nan=1.0)  # a NaN row (diverged) draws uniformly; see above
        tokens = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
        if cfg.logit_noise > 0 or cfg.top_p < 1:  # q is not pi: log q, the renormalised nucleus (and noise)
            behaviour = torch.log_softmax(scores, -1).gather(-1, tokens[:, None]).squeeze(-1)
    return tokens, logprobs.gather(-1, tokens[:, None]).squeeze(-1), behaviour


@torch.no_grad()
def sample(
    model,
    inputs_embeds: torch.Tensor,
    attention_mask: torch.Tensor,
    cfg: SamplingConfig,
    eos_id: int | list[int],
    pad_id: int,
    generator: torch.Generator | None = None,
    *,
    past_key_values=None,
    capture: LayerCapture | None = None,
    on_token: Callable[[int, torch.Tensor, torch.Tensor], None] | None = None,
    group_size: int = 1,
) -> Completions:
    """Continue each left-padded prefix of embeddings `(B, P, H)` for up to `cfg.max_new_tokens`.

    The prefix is encoded once; every later step feeds only the newest token against the KV cache.
    Rows that have emitted end-of-sequence keep running (cheaper than re-packing the batch) but
    their further tokens are replaced by padding and masked out; the loop stops when all are done.
    `eos_id`: the id, or ids, that end a row (a checkpoint may list several: `modeling.stop_token_ids`).
    With `cfg.stop_at_eos` false no row is ever done: every row gets `max_new_tokens` tokens.

    past_key_values: a cache that already holds the first columns of `attention_mask`; then
        `inputs_embeds` are only the new positions that continue it (e.g. a virtual token).
    capture, on_token: with an active `LayerCapture`, `on_token(t, states, alive)` receives, for
        generated token t, the chosen layers' states `(B, L, H)` at the position that predicted it
        (the last prefix position for t = 0) and which rows were still generating.
    group_size: G > 1 continues each of the B prefixes G times: the prefix (and `past_key_values`)
        runs on B rows, then its cache and last logits are repeated to B * G rows, and the draws are
        those of B * G repeated prefixes (the same generator calls on the same logits).
    """
    if on_token is not None and capture is None:
        raise ValueError("on_token needs an active LayerCapture to read hidden states from")
    if group_size > 1 and capture is not None:
        raise ValueError("group_size > 1 does not expand captured states: capture with group_size=1")
    new = inputs_embeds.shape[1]
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
    logits, cache = out.logits[:, -1], out.past_key_values
    if group_size > 1:  # (B, ...) -> (B * G, ...), row b * G + g continuing prefix b
        cache.batch_repeat_interleave(group_size)
        logits = logits.repeat_interleave(group_size, dim=0)
        attention_mask = attention_mask.repeat_interleave(group_size, dim=0)
        positions = positions.repeat_interleave(group_size, dim=0)
    batch = attention_mask.shape[0]
    next_position = positions[:, -1] + 1
    ids = torch.full((batch, cfg.max_new_tokens), pad_id, dtype=torch.long, device=device)
    logprobs = torch.zeros((batch, cfg.max_new_tokens), device=device)
    behaviour = None  # allocated at the first noisy draw
    mask = torch.zeros((batch, cfg.max_new_tokens), dtype=torch.bool, device=device)
    finished = torch.zeros(batch, dtype=torch.bool, device=device)
    # every id that ends a completion: eos, or all of a checkpoint's (modeling.stop_token_ids: Llama 3's <|eot_id|>)
    stop_ids = torch.tensor([eos_id] if isinstance(eos_id, int) else list(eos_id), device=device)
    steps = 0
    for t in range(cfg.max_new_tokens):
        tokens, token_logprobs, token_behaviour = choose_tokens(logits, cfg, generator)
        alive = ~finished
        ids[:, t] = torch.where(alive, tokens, pad_id)
        logprobs[:, t] = torch.where(alive, token_logprobs, 0.0)
        if token_behaviour is not None:
            behaviour = torch.zeros_like(logprobs) if behaviour is None else behaviour
            behaviour[:, t] = torch.where(alive, token_behaviour, 0.0)
        mask[:, t] = alive
        if on_token is not None:
            on_token(t, capture.last_position(), alive)
        if cfg.stop_at_eos:
            finished |= torch.isin(tokens, stop_ids)
        steps = t + 1
        if finished.all() or t == cfg.max_new_tokens - 1:
            break
        attention_mask = torch.cat([attention_mask, attention_mask.new_ones((batch, 1))], dim=1)
        out = model(
            input_ids=ids[:, t : t + 1],
            attention_mask=attention_mask,
            position_ids=next_position[:, None],
            past_key_values=cache,
            use_cache=True,
            logits_to_keep=1,
        )
        logits = out.logits[:, -1]
        next_position = next_position + 1
    if not torch.isfinite(logprobs).all():  # diverged logits give NaN or -inf log-probs: one check per generation
        raise _diverged()
    return Completions(
        ids[:, :steps], mask[:, :steps], logprobs[:, :steps], None if behaviour is None else behaviour[:, :steps]
    )


def completion_logprobs(
    model,
    prefix_embeds: torch.Tensor,
    prefix_mask: torch.Tensor,
    completions: Completions,
    temperature: float = 1.0,
    group_size: int = 1,
    rows: int | None = None,
) -> torch.Tensor:
    """log pi(token) of every sampled completion token `(B, T)`, with gradients, in the one teacher-forced pass
    of `teacher_forced_logits` (with group_size G > 1 its two passes) but without its `(B, T, V)` logits: the
    selected tokens' log-probs come `rows` positions at a time from the final hidden states (lm/logprobs.py),
    bitwise those of the full log_softmax.

    Positions after end-of-sequence are masked (zero). A train-mode model with activation checkpointing keeps no KV
    cache in its checkpointed blocks (HF drops it: a replayed block would append twice), so there the shared
    prefix runs once per row instead, in the one pass.
    """
    checkpointed = model.training and getattr(model, "is_activation_checkpointing", False)
    if group_size > 1 and not checkpointed:
        return _grouped_logprobs(model, prefix_embeds, prefix_mask, completions, group_size, temperature, rows)
    if group_size > 1:
        prefix_embeds = prefix_embeds.repeat_interleave(group_size, dim=0)
        prefix_mask = prefix_mask.repeat_interleave(group_size, dim=0)
    prefix_len, length = prefix_embeds.shape[1], completions.ids.shape[1]
    assert prefix_len > 0
    embeds = torch.cat([prefix_embeds, model.get_input_embeddings()(completions.ids)], dim=1)
    mask = torch.cat([prefix_mask, completions.mask.long()], dim=1)
    # the positions prefix_len-1 .. prefix_len+length-1 (logits_to_keep=length + 1); the last one predicts nothing
    logprobs = forward_logprobs(
        model,
        completions.ids,
        length + 1,
        temperature,
        rows,
        inputs_embeds=embeds,
        attention_mask=mask,
        position_ids=positions_from_mask(mask),
    )
    return logprobs * completions.mask


def _grouped_logprobs(
    model,
    prefix_embeds: torch.Tensor,
    prefix_mask: torch.Tensor,
    completions: Completions,
    group_size: int,
    temperature: float,
    rows: int | None,
) -> torch.Tensor:
    """`completion_logprobs` with a shared prefix: the two passes of `_grouped_logits`, log-probs in chunks."""
    first_logits, rest = _shared_prefix(model, prefix_embeds, prefix_mask, completions, group_size)
    logprobs = selected_logprobs(first_logits, completions.ids[:, :1], temperature, rows)
    if rest is not None:
        fed = completions.ids.shape[1] - 1
        logprobs = torch.cat(
            [logprobs, forward_logprobs(model, completions.ids[:, 1:], fed, temperature, rows, **rest)], dim=1
        )
    return logprobs * completions.mask


def teacher_forced_logits(
    model, prefix_embeds: torch.Tensor, prefix_mask: torch.Tensor, completions: Completions, group_size: int = 1
) -> torch.Tensor:
    """`(B, T, V)` logits that predict completion tokens 0..T-1, with gradients, teacher-forced.

    The logits at position t predict token t+1: the prefix's last position scores completion token 0,
    completion position j-1 scores token j. One pass over [prefix, completion]; with group_size G > 1
    the B / G prefixes (one per group: completion rows p * G .. p * G + G - 1 continue prefix p) run
    once and the completions run against their expanded KV cache (`_grouped_logits`).
    """
    if group_size > 1:
        return _grouped_logits(model, prefix_embeds, prefix_mask, completions, group_size)
    prefix_len, length = prefix_embeds.shape[1], completions.ids.shape[1]
    embeds = torch.cat([prefix_embeds, model.get_input_embeddings()(completions.ids)], dim=1)
    mask = torch.cat([prefix_mask, completions.mask.long()], dim=1)
    # keep the logits of positions prefix_len-1 .. prefix_len+length-1; the last one predicts nothing
    logits = model(
        inputs_embeds=embeds, attention_mask=mask, position_ids=positions_from_mask(mask), logits_to_keep=length + 1
    ).logits[:, :-1]
    assert logits.shape[1] == length and prefix_len > 0
    return logits


def _grouped_logits(
    model,
    prefix_embeds: torch.Tensor,
    prefix_mask: torch.Tensor,
    completions: Completions,
    group_size: int,
) -> torch.Tensor:
    """`teacher_forced_logits` with a shared prefix: two passes, the prefix on P rows, the completions on P * G.
    pass 1 (P rows):     [prefix]                    -> KV cache, logits of the last position (token 0)
    expand:              cache, logits, mask, positions repeated G times along the batch (differentiable)
    pass 2 (P * G rows): completion tokens 0..T-2    -> logits that score tokens 1..T-1
    The positions and attention mask are those of the one-pass version, so each score is the same.
    """
    first_logits, rest = _shared_prefix(model, prefix_embeds, prefix_mask, completions, group_size)
    if rest is None:
        return first_logits
    return torch.cat([first_logits, model(**rest).logits], dim=1)  # (P * G, T, V)


def _shared_prefix(
    model, prefix_embeds: torch.Tensor, prefix_mask: torch.Tensor, completions: Completions, group_size: int
) -> tuple[torch.Tensor, dict | None]:
    """Pass 1 of `_grouped_logits` and its expansion: ((P * G, 1, V) logits that score completion token 0, the
    inputs of pass 2 over completion tokens 0..T-2 against the expanded cache, or None when T = 1)."""
    rows, length = prefix_embeds.shape[0], completions.ids.shape[1]
    if completions.ids.shape[0] != rows * group_size:
        raise ValueError(f"{completions.ids.shape[0]} completions are not {rows} prefixes x {group_size}")
    first = model(
        inputs_embeds=prefix_embeds,
        attention_mask=prefix_mask,
        position_ids=positions_from_mask(prefix_mask),
        use_cache=True,
        logits_to_keep=1,
    )
    logits = first.logits.repeat_interleave(group_size, dim=0)  # (P * G, 1, V): scores completion token 0
    if length == 1:
        return logits, None
    cache = first.past_key_values
    cache.batch_repeat_interleave(group_size)  # (P, heads, L, d) -> (P * G, heads, L, d) in every layer
    mask = torch.cat([prefix_mask.repeat_interleave(group_size, dim=0), completions.mask.long()], dim=1)
    fed, start = length - 1, prefix_mask.shape[1]  # the last completion token predicts nothing
    return logits, {
        "input_ids": completions.ids[:, :fed],
        "attention_mask": mask[:, : start + fed],
        "position_ids": positions_from_mask(mask)[:, start : start + fed],
        "past_key_values": cache,
        "use_cache": True,
    }
