"""Surgery on real attention layouts: tiny random models built from transformers configs (2 blocks, width 32,
4 heads, the character tokenizer's 87-token vocabulary).

For each layout, scaling one head of q, k, v or o changes exactly that head: the fused projection's output,
split into q, k and v as the model's own forward splits it, changes in that head's slice only (by the factor),
exactly head_dim rows (Conv1D: columns) of the fused weight change, and the logits move. The theater restores
a fused weight bit for bit after a partial edit. On Qwen3 (per-head q/k RMSNorm) a q or k edit would be
normalised away, so q/k targets are refused naming the norm; v and o still act."""

import pytest
import torch

from latentlab.lm.surgery import SurgicalTheater, attention_targets, scale_heads
from latentlab.lm.tokenizer import build_char_tokenizer
from latentlab.rl.sac import SACConfig
from latentlab.rl.surgeon import Surgeon, SurgeonConfig

VOCAB, HIDDEN, HEADS, HEAD_DIM = 87, 32, 4, 8
# random weights large enough that attention is not uniform: a q/k edit must move the logits visibly
COMMON = {"vocab_size": VOCAB, "initializer_range": 0.3, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 1}


def build(layout: str):
    """A seeded tiny model of `layout`, in eval mode."""
    import transformers as t

    sizes = {"hidden_size": HIDDEN, "num_hidden_layers": 2, "num_attention_heads": HEADS}
    rope = {"intermediate_size": 64, "max_position_embeddings": 64}
    configs = {
        "llama": (t.LlamaConfig, t.LlamaForCausalLM, {**sizes, **rope, "num_key_value_heads": 2}),
        "qwen3": (t.Qwen3Config, t.Qwen3ForCausalLM, {**sizes, **rope, "num_key_value_heads": 2, "head_dim": 8}),
        "phi3": (t.Phi3Config, t.Phi3ForCausalLM, {**sizes, **rope, "num_key_value_heads": 2}),
        "gpt_neox": (t.GPTNeoXConfig, t.GPTNeoXForCausalLM, {**sizes, **rope}),  # query_key_value has a bias
        "bloom": (t.BloomConfig, t.BloomForCausalLM, {"hidden_size": HIDDEN, "n_layer": 2, "n_head": HEADS}),
        "falcon_mq": (t.FalconConfig, t.FalconForCausalLM, {**sizes, "bias": True}),  # multi-query: 1 k/v head
        "falcon_old": (t.FalconConfig, t.FalconForCausalLM, {**sizes, "multi_query": False}),
        "falcon_new": (
            t.FalconConfig,
            t.FalconForCausalLM,
            {**sizes, "new_decoder_architecture": True, "num_kv_heads": 2},
        ),
        "gpt2": (t.GPT2Config, t.GPT2LMHeadModel, {"n_embd": HIDDEN, "n_layer": 2, "n_head": HEADS, "n_positions": 64}),
    }
    config_class, model_class, kwargs = configs[layout]
    torch.manual_seed(0)
    model = model_class(config_class(**COMMON, **kwargs)).eval()
    with torch.no_grad():  # biases start at 0: random ones, so that a bias left unscaled shows
        for name, parameter in model.named_parameters():
            if name.endswith(".bias"):
                parameter.normal_(0, 0.3)
    return model


def attention_of(model, block: int):
    body = model.get_decoder()
    blocks = getattr(body, "layers", None) or body.h
    layer = blocks[block]
    return next(getattr(layer, n) for n in ("self_attn", "attn", "attention", "self_attention") if hasattr(layer, n))


def split_qkv(layout: str, attention, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """q, k, v `(T, heads, head_dim)` of input `x` `(T, H)`, split as the model's forward splits them (the unfused
    math: written here from transformers' code, not from latentlab's layout table)."""
    if layout in ("llama", "qwen3"):  # before q_norm / k_norm
        return {p: getattr(attention, f"{p}_proj")(x).unflatten(-1, (-1, HEAD_DIM)) for p in "qkv"}
    if layout == "phi3":
        qkv = attention.qkv_proj(x)
        q_end, kv = HEADS * HEAD_DIM, attention.num_key_value_heads * HEAD_DIM
        parts = qkv[..., :q_end], qkv[..., q_end : q_end + kv], qkv[..., q_end + kv :]
        return {p: part.unflatten(-1, (-1, HEAD_DIM)) for p, part in zip("qkv", parts)}
    if layout == "gpt_neox":
        return dict(zip("qkv", attention.query_key_value(x).unflatten(-1, (-1, 3 * HEAD_DIM)).chunk(3, dim=-1)))
    if layout in ("bloom", "falcon_old"):
        qkv = attention.query_key_value(x).unflatten(-1, (HEADS, 3, HEAD_DIM))
        return {p: qkv[..., i, :] for i, p in enumerate("qkv")}
    if layout == "falcon_mq":
        q, k, v = attention._split_heads(attention.query_key_value(x)[None])
        return {"q": q[0], "k": k[0], "v": v[0]}
    if layout == "falcon_new":  # per k/v group: [q heads of the group | k | v]
        qkv = attention.query_key_value(x).unflatten(-1, (attention.num_kv_heads, -1, HEAD_DIM))
        return {"q": qkv[:, :, :-2].flatten(1, 2), "k": qkv[:, :, -2], "v": qkv[:, :, -1]}
    if layout == "gpt2":
        return {p: part.unflatten(-1, (-1, HEAD_DIM)) for p, part in zip("qkv", attention.c_attn(x).split(HIDDEN, -1))}
    raise AssertionError(layout)


LAYOUTS = ["llama", "phi3", "gpt_neox", "bloom", "falcon_mq", "falcon_old", "falcon_new", "gpt2"]
IDS = torch.tensor([[5, 17, 40, 3, 22, 61, 9, 30, 12, 70]])


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).logits


def scale_one(targets, p: str, head: int, factor: float) -> None:
    factors = torch.ones(len(targets), max(t.heads for t in targets))
    factors[[t.projection for t in targets].index(p), head] = factor
    scale_heads(targets, factors)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("p", ["q", "k", "v"])
def test_a_qkv_head_edits_exactly_that_head(layout, p):
    model = build(layout)
    attention = attention_of(model, 1)
    targets = attention_targets(model, [1], ["q", "k", "v", "o"])
    target = next(t for t in targets if t.projection == p)
    x = torch.randn(5, HIDDEN)
    with torch.no_grad():
        before, weight_before, logits_before = split_qkv(layout, attention, x), target.weight.clone(), logits(model)
    for head in range(target.heads):  # every head, each edit undone by the theater before the next
        with SurgicalTheater(model, targets), torch.no_grad():
            scale_one(targets, p, head, 1.5)
            after = split_qkv(layout, attention, x)
            for name in "qkv":
                for h in range(before[name].shape[-2]):
                    if (name, h) == (p, head):
                        torch.testing.assert_close(after[name][..., h, :], 1.5 * before[name][..., h, :])
                    else:
                        assert torch.equal(after[name][..., h, :], before[name][..., h, :]), (head, name, h)
            changed = (target.weight != weight_before).any(dim=1 - target.feature_dim)  # per fused feature
            assert int(changed.sum()) == HEAD_DIM
            assert (logits(model) - logits_before).abs().max() > 1e-3
        assert torch.equal(target.weight, weight_before)


@pytest.mark.parametrize("layout", [*LAYOUTS, "qwen3"])
def test_an_o_head_scales_the_columns_it_reads(layout):
    model = build(layout)
    attention = attention_of(model, 0)
    (target,) = attention_targets(model, [0], ["o"])
    o = attention.c_proj if layout == "gpt2" else getattr(attention, "o_proj", None) or attention.dense
    heads_in = torch.randn(3, HEADS * HEAD_DIM)
    scaled_in = heads_in.clone()
    scaled_in[:, 2 * HEAD_DIM : 3 * HEAD_DIM] *= 0.5
    with torch.no_grad():
        expected, logits_before = o(scaled_in), logits(model)
        scale_one([target], "o", 2, 0.5)
        torch.testing.assert_close(o(heads_in), expected)
    assert (logits(model) - logits_before).abs().max() > 1e-3


@pytest.mark.parametrize("layout", LAYOUTS)
def test_the_theater_restores_a_fused_weight_bit_for_bit(layout):
    model = build(layout)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    targets = attention_targets(model, [0, 1])
    fused = {id(p): p for t in targets for p in t.parameters}  # q, k and v of a fused layout: one tensor, held once
    with SurgicalTheater(model, targets) as theater:
        assert theater.snapshot_bytes == sum(p.numel() * p.element_size() for p in fused.values())
        factors = torch.ones(len(targets), HEADS)
        factors[:, 1] = 1.25  # one head of each: a partial edit of each fused tensor
        scale_heads(targets, factors)
        assert theater.relative_change() > 0
        assert sum(not torch.equal(v, before[k]) for k, v in model.state_dict().items()) >= len(fused)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_qwen3_refuses_q_and_k_naming_the_norm_and_edits_v_and_o():
    model = build("qwen3")
    with pytest.raises(ValueError, match=r"q_norm \(Qwen3RMSNorm\).*normalised away"):
        attention_targets(model, [0], ["q"])
    with pytest.raises(ValueError, match=r"k_norm \(Qwen3RMSNorm\)"):
        attention_targets(model, None, ["v", "k"])
    # why: a q head's rows scaled by 1.5 by hand leave the logits where they were (the per-head norm undoes it)
    attention, before = attention_of(model, 1), logits(model)
    with torch.no_grad():
        attention.q_proj.weight[HEAD_DIM : 2 * HEAD_DIM] *= 1.5
    assert (logits(model) - before).abs().max() < 1e-5
    targets = attention_targets(model, [1], ["v", "o"])
    for p in ("v", "o"):
        with SurgicalTheater(model, targets):
            start = logits(model)
            scale_one(targets, p, 1, 1.5)
            assert (logits(model) - start).abs().max() > 1e-3


@pytest.mark.parametrize("layout", ["phi3", "gpt_neox", "falcon_new", "gpt2", "qwen3"])
def test_a_surgeon_step_on_each_layout(layout):
    """One surgical step (edit measured, undone) on each layout; Qwen3 refuses the default q/k/v/o at once."""
    model, tokenizer = build(layout), build_char_tokenizer()
    projections = ["v", "o"] if layout == "qwen3" else ["q", "k", "v", "o"]
    if layout == "qwen3":
        with pytest.raises(ValueError, match="q_norm"):
            Surgeon(model, tokenizer, SurgeonConfig(), None, torch.Generator())
    config = SurgeonConfig(layers=[-1], projections=projections, max_scale=0.2)
    generator = torch.Generator().manual_seed(0)
    agent = Surgeon.build_agent(model, config, SACConfig(learning_starts=2, batch_size=2), generator)
    surgeon = Surgeon(model, tokenizer, config, agent, generator)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    row = surgeon.step(["1+2=", "10+5="], ["3", "15"], may_commit=False)
    assert 0 < row["edit_relative_norm"] <= 0.2 and row["surgery_reward"] != 0
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
