"""The NLA critic's truncation and the actor's scale measurement on every decoder layout lm/capture.py supports:
blocks in `layers` (Llama, Qwen2, Qwen3) or `h` (GPT-2), final norm `norm` or `ln_f`, `config.layer_types`
(Qwen2/Qwen3) and GPT-2's `n_layer`. Tiny random models from transformers configs, the character tokenizer."""

import copy
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from latentlab.lm.capture import body_states, decoder_blocks
from latentlab.lm.modeling import TinyLMConfig, build_tiny_lm
from latentlab.lm.padding import pad_sequences
from latentlab.lm.tokenizer import build_char_tokenizer
from latentlab.policies.nla_actor import measure_scales
from latentlab.policies.nla_critic import (
    NLACritic,
    NLACriticConfig,
    build_critic,
    check_critic,
    load_critic,
    save_critic,
    truncated_encoder,
)

BLOCKS, H = 4, 32
FAMILIES = ["llama", "qwen2", "qwen3", "gpt2", "scratch-qwen2"]
REAL_TOKENIZERS = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "tokenizers"
TEXTS = ["12+7=19\n3+4=7", "40-9=31", "1+1=2\n", "7", "30+12=42\n5-5=0\n2+2=4"]


def _model(family: str):
    """(model, tokenizer): a seeded random `family`-shaped causal LM of BLOCKS blocks and width H."""
    from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig, Qwen2Config, Qwen3Config

    torch.manual_seed(0)
    tokenizer = build_char_tokenizer()
    ids = {"vocab_size": len(tokenizer), "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id}
    if family == "scratch-qwen2":  # what `model.arch: qwen2` builds
        sizes = TinyLMConfig(arch="qwen2", hidden_size=H, layers=BLOCKS, heads=4, intermediate_size=64)
        return build_tiny_lm(sizes, tokenizer).eval(), tokenizer
    if family == "gpt2":
        config = GPT2Config(n_layer=BLOCKS, n_embd=H, n_head=4, n_positions=64, bos_token_id=None, **ids)
    else:
        sizes = {"hidden_size": H, "intermediate_size": 64, "num_hidden_layers": BLOCKS, "max_position_embeddings": 64}
        heads = {"num_attention_heads": 4, "num_key_value_heads": 2}
        config = {
            "llama": lambda: LlamaConfig(**sizes, **heads, tie_word_embeddings=False, **ids),
            "qwen2": lambda: Qwen2Config(**sizes, **heads, tie_word_embeddings=True, **ids),
            "qwen3": lambda: Qwen3Config(**sizes, **heads, head_dim=8, tie_word_embeddings=True, **ids),
        }[family]()
    return AutoModelForCausalLM.from_config(config).eval(), tokenizer


def _batch(tokenizer, texts=TEXTS):
    tokens = [t + [tokenizer.eos_token_id] for t in tokenizer(texts, add_special_tokens=False)["input_ids"]]
    return pad_sequences(tokens, tokenizer.pad_token_id, False)


def _vectors(n, seed=0):
    return torch.randn(n, H, generator=torch.Generator().manual_seed(seed)).numpy()


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("layer", range(BLOCKS + 1))
def test_the_truncated_encoder_outputs_hidden_state_k_exactly(family, layer):
    model, tokenizer = _model(family)
    ids, mask = _batch(tokenizer)
    encoder = truncated_encoder(model, layer)
    with torch.no_grad():
        want = model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[layer]
        got = encoder(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    blocks, _ = decoder_blocks(encoder)
    assert len(blocks) == encoder.config.num_hidden_layers == layer
    if getattr(model.config, "layer_types", None) is not None:
        assert encoder.config.layer_types == model.config.layer_types[:layer]
    # the model itself is left whole
    assert len(decoder_blocks(model)[0]) == model.config.num_hidden_layers == BLOCKS
    assert not isinstance(decoder_blocks(model)[1], nn.Identity)


@pytest.mark.parametrize("family", FAMILIES)
def test_the_truncation_copies_only_the_kept_blocks(family):
    model, _ = _model(family)
    blocks, _ = decoder_blocks(model)

    def refuse(memo):
        raise AssertionError("a dropped block was copied")

    for block in blocks[2:]:
        object.__setattr__(block, "__deepcopy__", refuse)
    encoder = truncated_encoder(model, 2)
    kept = decoder_blocks(encoder)[0]
    assert len(kept) == 2 and all(a is not b for a, b in zip(kept, blocks, strict=False))
    assert kept[0].state_dict().keys() == blocks[0].state_dict().keys()
    assert all(torch.equal(p, q) for p, q in zip(kept.parameters(), blocks[:2].parameters(), strict=True))


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("layer", [2, -1])
def test_the_critic_saves_and_loads_back_on_every_layout(tmp_path, family, layer):
    model, tokenizer = _model(family)
    vectors = _vectors(6)
    critic = build_critic(model, tokenizer, NLACriticConfig(layer=layer, pooling="mean"), vectors)
    with torch.no_grad():  # a trained-looking head: not the identity start
        critic.head.weight.add_(0.01 * torch.randn_like(critic.head.weight))
    save_critic(critic, tmp_path / "critic")
    reloaded = load_critic(tmp_path / "critic")
    assert type(reloaded.encoder) is type(critic.encoder)
    assert reloaded.encoder.config.num_hidden_layers == (2 if layer == 2 else BLOCKS)
    with torch.no_grad():
        torch.testing.assert_close(reloaded.predict(TEXTS), critic.eval().predict(TEXTS), rtol=0, atol=0)


def test_check_critic_stops_a_critic_that_would_not_save_before_any_training():
    """What nla_sft met after its last step (a truncation that left `layer_types` behind) stops at build time."""
    model, tokenizer = _model("qwen2")
    encoder = copy.deepcopy(model.get_decoder())
    encoder.layers = encoder.layers[:2]
    encoder.config.num_hidden_layers = 2  # today's truncation: layer_types keeps 4 entries
    encoder.norm = nn.Identity()
    vectors = _vectors(4)
    critic = NLACritic(encoder, tokenizer, NLACriticConfig(layer=2), H, torch.tensor(vectors.mean(0)), torch.tensor(1))
    with pytest.raises(ValueError, match="(?s)could not be saved and loaded back.*layer_types"):
        check_critic(critic)


@pytest.mark.parametrize("family", FAMILIES)
def test_check_critic_leaves_the_random_state_alone(family):
    model, tokenizer = _model(family)
    critic = NLACritic(truncated_encoder(model, 2), tokenizer, NLACriticConfig(layer=2), H, torch.zeros(H), 1.0)
    state = torch.get_rng_state()
    check_critic(critic)
    assert torch.equal(torch.get_rng_state(), state)


@pytest.mark.parametrize("name", ["qwen3", "gpt2"])
def test_the_critic_round_trips_with_a_real_tokenizer(tmp_path, name):
    """A real tokenizer loads back as the class it was (Qwen's Qwen2Tokenizer, GPT-2's generic fast one)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2Config, Qwen3Config

    source = REAL_TOKENIZERS / name
    if not source.exists():
        pytest.skip(f"{source} is absent")
    tokenizer = AutoTokenizer.from_pretrained(source)
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    torch.manual_seed(0)
    if name == "gpt2":
        config = GPT2Config(vocab_size=len(tokenizer), n_embd=H, n_layer=BLOCKS, n_head=4)
    else:
        sizes = {"hidden_size": H, "intermediate_size": 64, "num_hidden_layers": BLOCKS, "head_dim": 8}
        config = Qwen3Config(vocab_size=len(tokenizer), num_attention_heads=4, num_key_value_heads=2, **sizes)
    model = AutoModelForCausalLM.from_config(config).eval()
    critic = build_critic(model, tokenizer, NLACriticConfig(layer=2), _vectors(4))
    save_critic(critic, tmp_path / "critic")
    reloaded = load_critic(tmp_path / "critic")
    texts = ["12+7=19\nthe answer", "a cat <|endoftext|> sat"]
    assert type(reloaded.tokenizer) is type(tokenizer)
    with torch.no_grad():
        torch.testing.assert_close(reloaded.predict(texts), critic.eval().predict(texts), rtol=0, atol=0)


# ---------------------------------------------------------------- measure_scales


def _today(model, tokenizer, layers, texts):
    """measure_scales before issue 27: one forward over every text, full logits and all hidden states."""
    ids, mask = pad_sequences(tokenizer(texts, add_special_tokens=False)["input_ids"], tokenizer.pad_token_id, False)
    out = model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    real = mask.bool()
    return [out.hidden_states[layer][real].float().norm(dim=-1).mean().item() for layer in layers]


def _texts(n, seed=0):
    rng = random.Random(seed)
    tail = "0123456789+-=\n"
    return [
        f"{rng.randint(0, 49)}{rng.choice('+-')}{rng.randint(0, 49)}="
        + "".join(rng.choice(tail) for _ in range(rng.randint(0, 40)))
        for _ in range(n)
    ]


def _fail_on_lm_head(model):
    def hook(module, args):
        raise AssertionError("the LM head was called")

    return model.get_output_embeddings().register_forward_pre_hook(hook)


@pytest.mark.parametrize("batch_size", [1, 7, 64, 1000])
def test_measure_scales_equals_todays_on_the_default_scratch_model_without_the_lm_head(batch_size):
    """The default DAG's model shape (params.yaml `model`): the same floats, bit for bit, in batches."""
    torch.manual_seed(0)
    tokenizer = build_char_tokenizer()
    model = build_tiny_lm(TinyLMConfig(hidden_size=64, layers=4, heads=4, intermediate_size=256), tokenizer).eval()
    texts, layers = _texts(300), [0, 1, 2, 3, 4, -1]
    with torch.no_grad():
        want = _today(model, tokenizer, layers, texts)
    handle = _fail_on_lm_head(model)
    try:
        got = measure_scales(model, tokenizer, layers, texts, batch_size=batch_size)
    finally:
        handle.remove()
    assert got == want


@pytest.mark.parametrize("family", FAMILIES)
def test_measure_scales_on_every_layout_never_calls_the_lm_head(family):
    model, tokenizer = _model(family)
    texts, layers = _texts(40, seed=1), [2, 0, BLOCKS]
    with torch.no_grad():
        want = _today(model, tokenizer, layers, texts)
    handle = _fail_on_lm_head(model)
    try:
        got = measure_scales(model, tokenizer, layers, texts, batch_size=16)
    finally:
        handle.remove()
    np.testing.assert_allclose(got, want, rtol=1e-6)


@pytest.mark.parametrize("family", FAMILIES)
def test_body_states_stop_at_the_highest_layer_asked_for(family):
    model, tokenizer = _model(family)
    ids, mask = _batch(tokenizer)
    blocks, norm = decoder_blocks(model)
    with torch.no_grad():
        want = model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states

    def refuse(module, args, output):
        raise AssertionError("a block from the highest layer on ran")

    handles = [block.register_forward_hook(refuse) for block in blocks[2:]]
    handles.append(norm.register_forward_hook(refuse))
    handles.append(_fail_on_lm_head(model))
    try:
        got = body_states(model, [2, 0, 1], ids, mask)
    finally:
        for handle in handles:
            handle.remove()
    for layer, state in zip([2, 0, 1], got, strict=True):
        torch.testing.assert_close(state, want[layer], rtol=0, atol=0)
