"""SurgicalTheater: snapshot only the targets, restore bit for bit (also on errors), commit, refuse overlap;
scale_heads edits exactly one head's features, on Llama and on GPT-2's fused c_attn."""

import copy

import pytest
import torch

from latentlab.lm import surgery
from latentlab.lm.surgery import SurgeryError, SurgicalTheater, attention_targets, scale_heads
from tests.tiny import new_tiny_lm


def tiny_gpt2():
    """A random 2-block GPT-2 built from a config here (nothing downloaded)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=40, n_positions=32, n_embd=32, n_layer=2, n_head=4)
    return GPT2LMHeadModel(config).eval()


def state(model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_identical(model, before: dict[str, torch.Tensor]) -> None:
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name]), name


def perturb(targets) -> None:
    with torch.no_grad():
        for target in targets:
            target.weight.add_(torch.randn_like(target.weight))


@pytest.mark.parametrize("build", [lambda: new_tiny_lm()[0], tiny_gpt2], ids=["llama", "gpt2"])
def test_restores_bit_for_bit_and_commit_keeps(build):
    model = build()
    targets = attention_targets(model, [1], ["q", "k", "v", "o"])
    before = state(model)
    with SurgicalTheater(model, targets):
        perturb(targets)
        assert any(not torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert_identical(model, before)

    with SurgicalTheater(model, targets) as theater:
        perturb(targets)
        edited = state(model)
        theater.commit()
    assert_identical(model, edited)
    assert any(not torch.equal(edited[k], before[k]) for k in before)


def test_restores_when_the_body_raises_even_after_commit(tiny_lm):
    model = copy.deepcopy(tiny_lm[0])
    targets = attention_targets(model, [0, -1])
    before = state(model)
    with pytest.raises(KeyError):
        with SurgicalTheater(model, targets) as theater:
            perturb(targets)
            theater.commit()
            raise KeyError("evaluation failed")
    assert_identical(model, before)
    with SurgicalTheater(model, targets):  # and the weights are free again
        pass


def test_snapshots_only_the_targets(tiny_lm):
    model = tiny_lm[0]
    targets = attention_targets(model, [1], ["q", "o"])
    theater = SurgicalTheater(model, targets)
    q, o = model.model.layers[1].self_attn.q_proj.weight, model.model.layers[1].self_attn.o_proj.weight
    assert theater.snapshot_bytes == (q.numel() + o.numel()) * 4
    assert theater.snapshot_bytes < sum(p.numel() * 4 for p in model.parameters()) / 10


def test_nesting_and_overlap_are_refused(tiny_lm):
    model = copy.deepcopy(tiny_lm[0])
    theater = SurgicalTheater(model, attention_targets(model, [0], ["q"]))
    with theater:
        with pytest.raises(SurgeryError, match="already open"):
            theater.__enter__()
        with pytest.raises(SurgeryError, match="already held"):
            with SurgicalTheater(model, attention_targets(model, [0], ["q", "v"])):
                pass
        with SurgicalTheater(model, attention_targets(model, [1], ["q"])):  # other weights: fine
            pass
    with pytest.raises(SurgeryError, match="inside"):
        theater.commit()
    gpt2 = tiny_gpt2()  # q and k of GPT-2 share one fused tensor: the same weights
    with SurgicalTheater(gpt2, attention_targets(gpt2, [0], ["q"])):
        with pytest.raises(SurgeryError, match="already held"):
            with SurgicalTheater(gpt2, attention_targets(gpt2, [0], ["k"])):
                pass


def test_refuses_a_foreign_parameter(tiny_lm):
    with pytest.raises(ValueError, match="not a parameter"):
        SurgicalTheater(tiny_lm[0], [torch.nn.Parameter(torch.zeros(2))])
    with pytest.raises(IndexError, match="out of range"):
        attention_targets(tiny_lm[0], [5])


def test_scale_heads_llama_q_and_o(tiny_lm):
    model = copy.deepcopy(tiny_lm[0])
    attention = model.model.layers[0].self_attn
    q_target, o_target = attention_targets(model, [0], ["q", "o"])
    x = torch.randn(3, 32)
    q_before, heads_in = attention.q_proj(x), torch.randn(3, 32)
    o_scaled_input = heads_in.clone()
    o_scaled_input[:, 16:24] *= 0.5  # head 2 of 4, head_dim 8
    o_expected = attention.o_proj(o_scaled_input)
    factors = torch.ones(2, 4)
    factors[0, 1] = 1.1  # q head 1
    factors[1, 2] = 0.5  # o head 2
    scale_heads([q_target, o_target], factors)
    q_after = attention.q_proj(x)
    torch.testing.assert_close(q_after[:, 8:16], 1.1 * q_before[:, 8:16])
    torch.testing.assert_close(q_after[:, :8], q_before[:, :8], rtol=0, atol=0)
    torch.testing.assert_close(q_after[:, 16:], q_before[:, 16:], rtol=0, atol=0)
    torch.testing.assert_close(attention.o_proj(heads_in), o_expected)


def test_scale_heads_gpt2_fused_k():
    model = tiny_gpt2()
    c_attn = model.transformer.h[1].attn.c_attn
    (k_target,) = attention_targets(model, [1], ["k"])
    x = torch.randn(3, 32)
    before = c_attn(x)  # (3, 96) = q | k | v
    factors = torch.ones(1, 4)
    factors[0, 3] = 0.9  # k head 3 = features 32 + 24 .. 32 + 32
    scale_heads([k_target], factors)
    after = c_attn(x)
    torch.testing.assert_close(after[:, 56:64], 0.9 * before[:, 56:64])
    torch.testing.assert_close(after[:, :56], before[:, :56], rtol=0, atol=0)
    torch.testing.assert_close(after[:, 64:], before[:, 64:], rtol=0, atol=0)


def test_gqa_kv_heads():
    model, _ = new_tiny_lm(kv_heads=2)
    targets = attention_targets(model, [0], ["q", "k"])
    assert [t.heads for t in targets] == [4, 2]
    k = model.model.layers[0].self_attn.k_proj.weight
    before = k.detach().clone()
    scale_heads(targets, torch.tensor([[1.0, 1, 1, 1], [2.0, 1, 9, 9]]))  # columns past k's 2 heads unused
    torch.testing.assert_close(k[:8], 2 * before[:8])
    torch.testing.assert_close(k[8:], before[8:])


def test_a_failed_snapshot_leaves_nothing_held(tiny_lm, monkeypatch):
    """Out of memory while copying the second target: the theater does not open and holds nothing, so a
    later theater over the same weights opens (and they were never touched)."""
    model = copy.deepcopy(tiny_lm[0])
    targets = attention_targets(model, [0], ["q", "k", "v"])
    before = state(model)
    clone, calls = torch.Tensor.clone, []

    def failing_clone(tensor, *args, **kwargs):
        calls.append(tensor.shape)
        if len(calls) == 2:
            raise torch.OutOfMemoryError("out of memory (simulated)")
        return clone(tensor, *args, **kwargs)

    theater = SurgicalTheater(model, targets)
    with monkeypatch.context() as patch:
        patch.setattr(torch.Tensor, "clone", failing_clone)
        with pytest.raises(torch.OutOfMemoryError):
            with theater:
                pytest.fail("the body of a theater that could not snapshot must not run")
    assert len(calls) == 2
    with SurgicalTheater(model, targets):  # free: not refused as "already held"
        perturb(targets)
    with theater:  # the failed theater itself can be opened again
        perturb(targets)
    assert_identical(model, before)


def test_exit_restores_every_tensor_it_can_and_names_those_it_cannot(tiny_lm):
    """The body reshapes the first target and edits the second: the second is restored bit for bit, one error
    names the first, and nothing stays held."""
    model = copy.deepcopy(tiny_lm[0])
    attention = model.model.layers[0].self_attn
    q, k = attention.q_proj.weight, attention.k_proj.weight
    k_before = k.detach().clone()
    theater = SurgicalTheater(model, attention_targets(model, [0], ["q", "k"]))
    with pytest.raises(SurgeryError, match=r"model\.layers\.0\.self_attn\.q_proj\.weight") as error:
        with theater:
            with torch.no_grad():
                q.data = torch.zeros(3, 3)  # a shape the snapshot cannot be copied into
                k.add_(1.0)
    assert "k_proj" not in str(error.value)
    assert torch.equal(k, k_before)
    with SurgicalTheater(model, [k]):  # nothing left held
        pass
    assert theater not in surgery._HELD.values()
