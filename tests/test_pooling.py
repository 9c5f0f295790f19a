"""The one pooling function (latentlab/lm/pooling.py): each mode's values by hand, padding never read, both
shapes its users have, and the extractor's every path pooling through it."""

import typing

import pytest
import torch
from pydantic import ValidationError

from latentlab.hidden.extract import ExtractConfig, Extractor
from latentlab.lm.pooling import LEARNED, Pooling, pool
from latentlab.policies.nla_critic import NLACriticConfig

# (B, T, H) = (2, 3, 2): row 0 counts every position, row 1 only positions 1 and 2 (left padding at 0)
STATES = torch.tensor([[[1.0, -2.0], [3.0, 0.0], [5.0, 4.0]], [[0.0, 0.0], [2.0, 6.0], [-4.0, 2.0]]])
MASK = torch.tensor([[1, 1, 1], [0, 1, 1]])
SCORES = torch.tensor([[0.0, 0.0, 0.0], [0.0, 0.0, float(torch.log(torch.tensor(3.0)))]])  # row 1: weights 1/4, 3/4
EXPECTED = {  # by hand
    "mean": [[3.0, 2 / 3], [-1.0, 4.0]],
    "last": [[5.0, 4.0], [-4.0, 2.0]],
    "max": [[5.0, 4.0], [2.0, 6.0]],
    "cls": [[1.0, -2.0], [2.0, 6.0]],
    "weighted": [[3.0, 2 / 3], [0.25 * 2 - 0.75 * 4, 0.25 * 6 + 0.75 * 2]],
}


def test_every_mode_has_hand_computed_values():
    """A new mode in `Pooling` fails here until its values are worked out above."""
    assert set(EXPECTED) == set(typing.get_args(Pooling))


@pytest.mark.parametrize("how", typing.get_args(Pooling))
@pytest.mark.parametrize("poison", [1e30, float("inf"), float("nan")])
def test_each_mode_by_hand_with_padding_never_read(how, poison):
    states, scores = STATES.clone(), SCORES.clone()
    states[1, 0] = poison  # the padding holds garbage; so do the scores there
    scores[1, 0] = 1e30
    pooled = pool(states, MASK, how, scores)
    assert pooled.dtype == torch.float32 and pooled.shape == (2, 2)
    torch.testing.assert_close(pooled, torch.tensor(EXPECTED[how]))


@pytest.mark.parametrize("how", typing.get_args(Pooling))
def test_right_padding_and_trailing_layer_axes(how):
    """(B, T, L, H), padding on the right (the critic's and generation's side): each layer pools as alone."""
    right = torch.stack([STATES[0], STATES[1].roll(-1, 0)])  # row 1's positions first, padding last
    mask = torch.stack([MASK[0], MASK[1].roll(-1, 0)])
    scores = torch.stack([SCORES[0], SCORES[1].roll(-1, 0)])
    layered = torch.stack([right, 10 * right], dim=2)  # (2, 3, 2 layers, 2)
    pooled = pool(layered, mask, how, scores)
    assert pooled.shape == (2, 2, 2)
    expected = torch.tensor(EXPECTED[how])
    torch.testing.assert_close(pooled[:, 0], expected)
    torch.testing.assert_close(pooled[:, 1], 10 * expected)


def test_mean_is_float32_and_adds_positions_in_order():
    """Half-precision states are summed in float32; the sum is the position-by-position running sum the
    extractor kept before `pool` (the stores' bytes rest on it)."""
    torch.manual_seed(0)
    states, mask = torch.randn(16, 40, 2, 8), torch.rand(16, 40) > 0.3
    running = torch.zeros(16, 2, 8)
    for t in range(40):
        running.add_(torch.where(mask[:, t, None, None], states[:, t], 0))
    assert torch.equal(pool(states, mask, "mean"), running / mask.sum(1)[:, None, None])
    half = states.half()
    assert torch.equal(pool(half, mask, "mean"), pool(half.float(), mask, "mean"))


def test_weighted_needs_scores_and_unknown_modes_are_named():
    with pytest.raises(ValueError, match="needs scores"):
        pool(STATES, MASK, "weighted")
    with pytest.raises(ValueError, match="unknown pooling 'median'"):
        pool(STATES, MASK, "median")


def test_extraction_refuses_learned_modes_naming_the_key():
    assert LEARNED == ("weighted",)
    with pytest.raises(ValidationError, match="pooling") as error:
        ExtractConfig(pooling="weighted")
    assert "learned scores" in str(error.value)
    assert ExtractConfig().pooling == "mean"


def test_the_critic_takes_the_shared_modes():
    assert NLACriticConfig.model_fields["pooling"].annotation is Pooling


USABLE = [p for p in typing.get_args(Pooling) if p not in LEARNED]
PROMPTS = ["1+2=", "13-4=", "7+19=", "19+19=", "5-17="]


@pytest.mark.parametrize("how", USABLE)
@pytest.mark.parametrize("stop_at_eos", [True, False])
def test_generate_pools_the_states_it_stores(tiny_lm, how, stop_at_eos):
    """Generate mode: the pooled vector is `pool` over the stored `tokens` (float16) with the rows' counts."""
    cfg = ExtractConfig(layers=[1, -1], tokens=6, pooling=how, stop_at_eos=stop_at_eos)
    result = Extractor(*tiny_lm, cfg)(PROMPTS, torch.Generator().manual_seed(0), store_tokens=True)
    assert result.counts.min() < 6 if stop_at_eos else result.counts.min() == 6  # a row ended early: padding
    counted = torch.arange(6)[None] < result.counts[:, None]  # (B, T): each row's positions, left-aligned
    assert not result.tokens[~counted].any()  # nothing stored past a row's end
    torch.testing.assert_close(result.pooled, pool(result.tokens, counted, how), atol=2e-3, rtol=2e-3)


@pytest.mark.parametrize("how", USABLE)
@pytest.mark.parametrize("tokens", [1, 4])
def test_a_row_pools_the_same_alone_as_in_a_padded_batch(tiny_lm, how, tokens):
    """Prompt mode pads on the left: the pooled vector of a short prompt does not see the padding."""
    extractor = Extractor(*tiny_lm, ExtractConfig(layers=[-1], tokens=tokens, temperature=0.0, pooling=how))
    batch = extractor(PROMPTS, torch.Generator().manual_seed(0)).pooled
    alone = extractor(PROMPTS[:1], torch.Generator().manual_seed(0)).pooled
    torch.testing.assert_close(batch[:1], alone, atol=1e-5, rtol=1e-5)


def test_pooling_modes_differ_on_real_states(tiny_lm):
    """The modes are not all the same vector (else the tests above could not tell them apart)."""
    pooled = {
        how: Extractor(*tiny_lm, ExtractConfig(layers=[-1], tokens=1, pooling=how))(PROMPTS).pooled for how in USABLE
    }
    for a in USABLE:
        for b in USABLE:
            assert a == b or not torch.allclose(pooled[a], pooled[b])
