"""The one sampler: log-prob alignment, end-of-sequence, left padding, capture and cache reuse."""

import pytest
import torch

from latentlab.common.errors import NonFiniteLogitsError
from latentlab.lm.capture import LayerCapture
from latentlab.lm.sampling import (
    Completions,
    SamplingConfig,
    choose_tokens,
    completion_logprobs,
    sample,
    tokenize_prompts,
)

PROMPTS = ["3+4=", "12-5=", "40+9=", "1+1=", "48-47="]


def _sample(model, tokenizer, prompts, cfg, seed=0, **kwargs):
    ids, mask = tokenize_prompts(tokenizer, prompts, "cpu")
    embeds = model.get_input_embeddings()(ids)
    completions = sample(
        model,
        embeds,
        mask,
        cfg,
        tokenizer.eos_token_id,
        tokenizer.pad_token_id,
        torch.Generator().manual_seed(seed),
        **kwargs,
    )
    return ids, mask, embeds, completions


@torch.no_grad()
def test_sampled_logprobs_match_a_slow_token_by_token_reference(tiny_lm):
    model, tokenizer = tiny_lm
    cfg = SamplingConfig(max_new_tokens=8, temperature=0.7)
    ids, mask, embeds, completions = _sample(model, tokenizer, PROMPTS, cfg)
    teacher_forced = completion_logprobs(model, embeds, mask, completions, temperature=0.7)
    for row, prompt in enumerate(PROMPTS):
        prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        for t in range(int(completions.mask[row].sum())):
            # no padding, no cache: the whole sequence up to token t, read the last logits
            sequence = torch.tensor([prompt_ids + completions.ids[row, :t].tolist()])
            logits = model(input_ids=sequence).logits[0, -1]
            expected = torch.log_softmax(logits / 0.7, -1)[completions.ids[row, t]]
            assert completions.logprobs[row, t].item() == pytest.approx(expected.item(), abs=1e-4)
            assert teacher_forced[row, t].item() == pytest.approx(expected.item(), abs=1e-4)


def test_everything_after_eos_is_padding_and_masked(tiny_lm):
    model, tokenizer = tiny_lm
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    _, _, _, completions = _sample(model, tokenizer, PROMPTS * 16, SamplingConfig(max_new_tokens=24, temperature=1.5))
    finished = 0
    for ids, mask, logprobs in zip(completions.ids, completions.mask, completions.logprobs):
        hits = (ids == eos).nonzero()
        if len(hits):
            finished += 1
            end = hits[0].item()
            assert mask[: end + 1].all() and not mask[end + 1 :].any()
            assert (ids[end + 1 :] == pad).all() and (logprobs[end + 1 :] == 0).all()
        else:
            assert mask.all()
    assert 0 < finished < len(completions.ids)  # both cases were exercised


def test_greedy_output_does_not_depend_on_left_padding(tiny_lm):
    model, tokenizer = tiny_lm
    cfg = SamplingConfig(max_new_tokens=6, temperature=0.0)
    alone = _sample(model, tokenizer, ["1+1="], cfg)[3]
    batched = _sample(model, tokenizer, ["1+1=", "48-47=", "12+30="], cfg)[3]
    n = int(alone.mask[0].sum())
    assert batched.ids[0, :n].tolist() == alone.ids[0, :n].tolist()


def test_tiny_top_p_is_greedy_and_noise_changes_samples_not_logprobs(tiny_lm):
    model, tokenizer = tiny_lm
    greedy = _sample(model, tokenizer, PROMPTS, SamplingConfig(max_new_tokens=6, temperature=0.0))[3]
    nucleus = _sample(model, tokenizer, PROMPTS, SamplingConfig(max_new_tokens=6, temperature=1.0, top_p=1e-6))[3]
    assert torch.equal(greedy.ids, nucleus.ids)
    plain = _sample(model, tokenizer, PROMPTS * 4, SamplingConfig(max_new_tokens=6), seed=1)
    noisy = _sample(model, tokenizer, PROMPTS * 4, SamplingConfig(max_new_tokens=6, logit_noise=3.0), seed=1)
    assert not torch.equal(plain[3].ids, noisy[3].ids)
    _, mask, embeds, completions = noisy
    with torch.no_grad():  # log-probs stay those of pi = softmax(logits / T), without the noise
        assert torch.allclose(completion_logprobs(model, embeds, mask, completions), completions.logprobs, atol=1e-4)


@torch.no_grad()
def test_captured_states_are_those_that_predicted_each_token(tiny_lm):
    model, tokenizer = tiny_lm
    seen = {}
    with LayerCapture(model, [0, 1, -1]) as capture:
        ids, mask, embeds, completions = _sample(
            model,
            tokenizer,
            PROMPTS,
            SamplingConfig(max_new_tokens=5, temperature=1.0),
            capture=capture,
            on_token=lambda t, states, alive: seen.__setitem__(t, (states.clone(), alive.clone())),
        )
    full = torch.cat([ids, completions.ids], 1)
    full_mask = torch.cat([mask, completions.mask.long()], 1)
    reference = model(
        input_ids=full,
        attention_mask=full_mask,
        output_hidden_states=True,
        position_ids=(full_mask.cumsum(-1) - 1).clamp(min=0),
    ).hidden_states
    prompt_len = ids.shape[1]
    for t, (states, alive) in seen.items():
        assert torch.equal(alive, completions.mask[:, t])
        for j, layer in enumerate([0, 1, -1]):
            expected = reference[layer][:, prompt_len - 1 + t]  # the position whose logits chose token t
            assert torch.allclose(states[:, j][alive], expected[alive], atol=1e-4)


def test_layer_out_of_range_is_a_clear_error(tiny_lm):
    model, _ = tiny_lm
    with pytest.raises(IndexError, match="layer 3 is out of range"):
        LayerCapture(model, [3])


@torch.no_grad()
def test_continuing_a_cache_equals_encoding_the_whole_prefix(tiny_lm):
    model, tokenizer = tiny_lm
    cfg = SamplingConfig(max_new_tokens=6, temperature=0.0)
    ids, mask, embeds, whole = _sample(model, tokenizer, PROMPTS, cfg)
    head = model(
        inputs_embeds=embeds[:, :-1],
        attention_mask=mask[:, :-1],
        position_ids=(mask[:, :-1].cumsum(-1) - 1).clamp(min=0),
        use_cache=True,
    )
    continued = sample(
        model,
        embeds[:, -1:],
        mask,
        cfg,
        tokenizer.eos_token_id,
        tokenizer.pad_token_id,
        past_key_values=head.past_key_values,
    )
    assert torch.equal(whole.ids, continued.ids)


def test_group_sampling_draws_what_repeated_prompts_draw(tiny_lm):
    """Prefix on P rows, cache expanded to P * G: the same tokens as sampling P * G repeated prompts."""
    model, tokenizer = tiny_lm
    cfg, G = SamplingConfig(max_new_tokens=6, temperature=1.3), 4
    repeated = [p for p in PROMPTS for _ in range(G)]
    _, _, _, expected = _sample(model, tokenizer, repeated, cfg, seed=3)
    _, _, _, grouped = _sample(model, tokenizer, PROMPTS, cfg, seed=3, group_size=G)
    assert grouped.ids.shape == expected.ids.shape == (len(PROMPTS) * G, grouped.ids.shape[1])
    assert torch.equal(grouped.ids, expected.ids) and torch.equal(grouped.mask, expected.mask)
    assert torch.allclose(grouped.logprobs, expected.logprobs, atol=1e-5)
    assert len({tuple(row.tolist()) for row in grouped.ids}) > len(PROMPTS)  # groups hold different completions


def test_shared_prefix_logprobs_and_gradients_equal_the_unshared_pass():
    """The prefix forward on one row per group, its KV cache expanded: the same log-probs and the same
    gradient of every parameter as one pass over the P * G full sequences (float32 rounding only)."""
    from tests.tiny import new_tiny_lm

    model, tokenizer = new_tiny_lm()
    G = 3
    cfg = SamplingConfig(max_new_tokens=7, temperature=1.5)
    ids, mask, _, sampled = _sample(model, tokenizer, PROMPTS, cfg, seed=1, group_size=G)
    # end row r at token r % 7 (end-of-sequence there, padding after): completions of every length, masked tails
    ends = torch.arange(len(sampled.ids)) % 7
    after = torch.arange(7)[None] > ends[:, None]
    tokens = sampled.ids.masked_fill(after, tokenizer.pad_token_id)
    tokens[torch.arange(len(tokens)), ends] = tokenizer.eos_token_id
    completions = Completions(tokens, ~after, sampled.logprobs)
    results = []
    for shared in (False, True):
        model.zero_grad(set_to_none=True)
        embeds, prefix_mask = model.get_input_embeddings()(ids), mask  # (P, L, H): rows of the P prompts
        if not shared:  # every completion with its own copy of the prompt
            embeds, prefix_mask = embeds.repeat_interleave(G, 0), prefix_mask.repeat_interleave(G, 0)
        logprobs = completion_logprobs(model, embeds, prefix_mask, completions, 1.5, group_size=G if shared else 1)
        # any loss that weighs rows and tokens differently: each row's gradient must land on its own prefix
        weights = torch.arange(1, logprobs.numel() + 1, dtype=torch.float32).view_as(logprobs).sin()
        (logprobs * weights).sum().backward()
        results.append((logprobs.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (unshared, unshared_grads), (shared, shared_grads) = results
    assert torch.allclose(shared, unshared, atol=1e-5) and (shared != 0).sum() == completions.mask.sum()
    for name, grad in unshared_grads.items():
        assert grad.abs().max() > 0, name
        assert torch.allclose(shared_grads[name], grad, atol=1e-5, rtol=1e-4), name


def test_group_size_one_token_completions_and_capture(tiny_lm):
    model, tokenizer = tiny_lm
    cfg = SamplingConfig(max_new_tokens=1)
    ids, mask, embeds, completions = _sample(model, tokenizer, PROMPTS, cfg, group_size=2)
    assert completions.ids.shape == (2 * len(PROMPTS), 1)
    shared = completion_logprobs(model, embeds, mask, completions, group_size=2)  # no second pass: T = 1
    assert torch.allclose(shared, completions.logprobs, atol=1e-5)
    with pytest.raises(ValueError, match="5 prefixes x 3"):
        completion_logprobs(model, embeds, mask, completions, group_size=3)
    with LayerCapture(model, [1]) as capture, pytest.raises(ValueError, match="group_size"):
        sample(model, embeds, mask, cfg, 1, 0, capture=capture, group_size=2)


def test_noisy_draws_come_with_the_behaviour_logprobs_that_importance_correct_them():
    """Noise on the logits draws from q = softmax(logits / T + noise), not from pi: the sampler returns log q of
    each drawn token (q given the drawn noise). Weighting draws by pi / q gives back pi's frequencies."""
    pi = torch.tensor([0.644, 0.237, 0.087, 0.032])
    n = 400_000
    cfg = SamplingConfig(max_new_tokens=1, logit_noise=2.0)
    tokens, logprobs, behaviour = choose_tokens(pi.log().expand(n, 4), cfg, torch.Generator().manual_seed(0))
    torch.testing.assert_close(logprobs, pi.log()[tokens])
    # the marginal q of noise 2.0 is about [0.476 0.282 0.158 0.084]: the raw draws are far from pi
    frequencies = torch.bincount(tokens, minlength=4) / n
    torch.testing.assert_close(frequencies, torch.tensor([0.476, 0.282, 0.158, 0.084]), atol=0.005, rtol=0)
    # E_q[pi / q 1{a = k}] = pi_k (conditionally on the noise, hence also over it); standard errors < 0.006
    corrected = torch.bincount(tokens, weights=(logprobs - behaviour).exp(), minlength=4) / n
    torch.testing.assert_close(corrected, pi, atol=0.02, rtol=0)


def test_no_noise_draws_from_pi_exactly_as_before(tiny_lm):
    """Noise 0: no behaviour log-probs, and not one extra draw from the generator."""
    logits = torch.randn(6, 40, generator=torch.Generator().manual_seed(1))
    generator, reference = torch.Generator().manual_seed(2), torch.Generator().manual_seed(2)
    tokens, logprobs, behaviour = choose_tokens(logits, SamplingConfig(max_new_tokens=1, temperature=0.8), generator)
    expected = torch.multinomial(torch.softmax(torch.log_softmax(logits / 0.8, -1), -1), 1, generator=reference)
    assert behaviour is None and torch.equal(tokens, expected.squeeze(-1))
    assert torch.equal(generator.get_state(), reference.get_state())
    model, tokenizer = tiny_lm
    assert _sample(model, tokenizer, PROMPTS, SamplingConfig(max_new_tokens=4))[3].behaviour_logprobs is None
    noisy = _sample(model, tokenizer, PROMPTS, SamplingConfig(max_new_tokens=4, logit_noise=1.0))[3]
    assert noisy.behaviour_logprobs.shape == noisy.logprobs.shape
    assert (noisy.behaviour_logprobs[~noisy.mask] == 0).all() and (noisy.behaviour_logprobs[noisy.mask] < 0).all()
    assert not torch.allclose(noisy.behaviour_logprobs, noisy.logprobs)


@pytest.mark.parametrize("temperature", [1.0, 0.0], ids=["sampled", "greedy"])
@pytest.mark.parametrize("value", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_diverged_weights_are_named_not_a_multinomial_error(temperature, value):
    from tests.tiny import new_tiny_lm

    model, tokenizer = new_tiny_lm()
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight.fill_(value)
    cfg = SamplingConfig(max_new_tokens=3, temperature=temperature)
    with pytest.raises(NonFiniteLogitsError, match="logits are not finite.*weights have diverged"):
        _sample(model, tokenizer, PROMPTS, cfg)


def test_the_actor_critic_names_diverged_weights_too():
    from latentlab.policies.actor_critic import ActorCritic, ActorCriticConfig

    torch.manual_seed(0)
    policy = ActorCritic(ActorCriticConfig(image=(8, 8), use_hidden=False, channels=2, features=8))
    image = torch.zeros(2, 8, 8, 3, dtype=torch.uint8)
    assert policy.act(image, greedy=False, generator=torch.Generator().manual_seed(0)).shape == (2,)
    with torch.no_grad():
        policy.actor[-1].bias.fill_(float("nan"))
    for greedy in (False, True):
        with pytest.raises(NonFiniteLogitsError, match="logits are not finite"):
            policy.act(image, greedy=greedy, generator=torch.Generator().manual_seed(0))


def test_any_of_several_stop_ids_ends_a_row(tiny_lm):
    """A checkpoint may list several stop ids (Llama 3's chat turns end in <|eot_id|>, not eos): a row ends at the
    first of any of them; with eos alone the same greedy row runs on past that token."""
    model, tokenizer = tiny_lm
    cfg = SamplingConfig(max_new_tokens=6, temperature=0)
    ids, mask = tokenize_prompts(tokenizer, ["12+7="], "cpu")
    embeds = model.get_input_embeddings()(ids)
    free = sample(model, embeds, mask, cfg, tokenizer.eos_token_id, tokenizer.pad_token_id)
    first = int(free.ids[0, 0])
    assert first != tokenizer.eos_token_id and free.lengths[0] > 1
    stopped = sample(model, embeds, mask, cfg, [tokenizer.eos_token_id, first], tokenizer.pad_token_id)
    assert stopped.lengths.tolist() == [1] and int(stopped.ids[0, 0]) == first
