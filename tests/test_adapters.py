"""LoRA adapters (latentlab/lm/adapters.py) and the adapters-off reference (latentlab/policies/adapter.py).

The tiny Llama of tests/tiny.py, and the real families' shapes (tests/families.py `config`: GQA, qkv bias, q/k
norm, GPT-2's fused Conv1D) built from their configs alone, with random weights.
"""

import json
import shutil

import pytest
import torch
from peft import PeftModel
from torch import nn
from transformers import AutoModelForCausalLM, MistralConfig
from transformers.pytorch_utils import Conv1D

from latentlab.lm.adapters import DEFAULT_TARGETS, LoRAConfig, add_lora, merged, save_adapter, trained_parameters
from latentlab.lm.modeling import MANIFEST, content_hash, load_lm, save_lm
from latentlab.lm.sampling import SamplingConfig
from latentlab.policies.adapter import AdapterDisabled
from latentlab.policies.lm_policy import LMPolicy
from tests.families import config
from tests.tiny import new_tiny_lm

FAMILIES = ["llama3", "qwen2", "qwen3", "gpt2"]  # tests/families.py names; model_type llama, qwen2, qwen3, gpt2
IDS = torch.tensor([[3, 9, 4, 20, 7, 11], [5, 5, 8, 2, 30, 6]])


def family_lm(name: str, seed: int = 0):
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config(name)).eval()


def targeted(model, targets: list[str]) -> dict[str, nn.Module]:
    """The layers a LoRA config with `targets` adapts: every Linear or Conv1D whose name ends in one of them."""
    return {
        name: module
        for name, module in model.named_modules()
        if name.rsplit(".", 1)[-1] in targets and isinstance(module, nn.Linear | Conv1D)
    }


def shape(module: nn.Module) -> tuple[int, int]:
    """(in, out) of a Linear (weight out x in) or of GPT-2's Conv1D (weight in x out)."""
    if isinstance(module, Conv1D):
        return module.weight.shape[0], module.weight.shape[1]
    return module.in_features, module.out_features


def set_b_nonzero(peft_model, seed: int = 1) -> None:
    """B starts at zero (the adapted model is the base at first): give every B random values."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if "lora_B" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.1)


@pytest.mark.parametrize("name", FAMILIES)
def test_the_family_default_targets_all_exist(name):
    model = family_lm(name)
    family = model.config.model_type
    found = {path.rsplit(".", 1)[-1] for path in targeted(model, DEFAULT_TARGETS[family])}
    assert found == set(DEFAULT_TARGETS[family])


def test_an_unknown_family_needs_its_targets_named():
    model = AutoModelForCausalLM.from_config(
        MistralConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1)
    )  # fmt: skip
    with pytest.raises(ValueError, match=r"model_type 'mistral'.*model\.lora\.target_modules"):
        add_lora(model, LoRAConfig())
    adapted = add_lora(model, LoRAConfig(target_modules=["q_proj", "v_proj"]))
    assert trained_parameters(adapted) == 1 * 8 * ((16 + 16) + (16 + 8))  # q: 16 -> 16, v: 16 -> 8 (one kv head)


@pytest.mark.parametrize("name", ["tiny", *FAMILIES])
def test_only_the_adapters_train_r_times_in_plus_out_per_target(name):
    model = new_tiny_lm()[0] if name == "tiny" else family_lm(name)
    cfg = LoRAConfig(rank=4)
    layers = targeted(model, DEFAULT_TARGETS[model.config.model_type])
    expected = sum(cfg.rank * sum(shape(layer)) for layer in layers.values())
    total = model.num_parameters()
    adapted = add_lora(model, cfg)
    trainable = [name for name, p in adapted.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert len(trainable) == 2 * len(layers)
    assert trained_parameters(adapted) == expected
    assert sum(p.numel() for p in adapted.parameters()) == total + expected


@pytest.mark.parametrize("name", ["tiny", "gpt2"])
def test_the_adapted_layer_computes_w_x_plus_alpha_over_r_b_a_x(name):
    model = new_tiny_lm()[0] if name == "tiny" else family_lm(name)
    target = "q_proj" if name == "tiny" else "c_attn"
    path = next(iter(targeted(model, [target])))
    adapted = add_lora(model, LoRAConfig(rank=4, alpha=12.0, target_modules=[target]))
    set_b_nonzero(adapted)
    layer = adapted.get_base_model().get_submodule(path)
    base = layer.base_layer
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight  # (r, in), (out, r)
    x = torch.randn(3, shape(base)[0], generator=torch.Generator().manual_seed(2))
    weight = base.weight.T if isinstance(base, Conv1D) else base.weight  # as (out, in)
    by_hand = x @ weight.T + (base.bias if base.bias is not None else 0) + (12.0 / 4) * (x @ a.T @ b.T)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), by_hand, rtol=1e-5, atol=1e-6, msg=path)
        assert not torch.allclose(layer(x), base(x), atol=1e-3)  # B nonzero: the adapter does change it


def test_the_same_seed_draws_the_same_adapters():
    def adapters(seed: int) -> dict[str, torch.Tensor]:
        model = new_tiny_lm()[0]
        torch.manual_seed(seed)
        return {k: v for k, v in add_lora(model, LoRAConfig()).state_dict().items() if "lora_" in k}

    one, again, other = adapters(5), adapters(5), adapters(6)
    assert one.keys() == again.keys() and all(torch.equal(one[k], again[k]) for k in one)
    a_weights = [k for k in one if "lora_A" in k]
    assert all(not torch.equal(one[k], other[k]) for k in a_weights)
    assert all(not one[k].any() for k in one if "lora_B" in k)  # B = 0: the adapted model starts as the base


def test_a_saved_adapter_loads_with_peft_and_gives_the_same_logits(tmp_path):
    model, tokenizer = new_tiny_lm()
    base_dir = tmp_path / "base"
    base_hash = save_lm(model, tokenizer, base_dir)
    adapted = add_lora(model, LoRAConfig(rank=4))
    set_b_nonzero(adapted)
    directory = tmp_path / "adapter"
    digest = save_adapter(adapted, directory, base_hash, trained_parameters=trained_parameters(adapted))

    files = sorted(p.name for p in directory.iterdir())
    assert {"adapter_config.json", "adapter_model.safetensors", MANIFEST} <= set(files)
    assert not [f for f in files if f.endswith((".bin", ".pt", ".pth", ".pkl"))]  # no pickle
    manifest = json.loads((directory / MANIFEST).read_text())
    assert manifest["base_sha256"] == base_hash == content_hash(base_dir)
    assert manifest["content_sha256"] == digest == content_hash(directory)
    assert manifest["trained_parameters"] == trained_parameters(adapted)
    targets = json.loads((directory / "adapter_config.json").read_text())["target_modules"]
    assert targets == sorted(DEFAULT_TARGETS["llama"])  # sorted: the same bytes whatever PYTHONHASHSEED

    base, _ = load_lm(base_dir)
    loaded = PeftModel.from_pretrained(base, directory)
    with torch.no_grad():
        assert torch.equal(loaded(IDS).logits, adapted(IDS).logits)


def test_the_merged_model_gives_the_adapted_logits_and_saves_as_plain_weights(tmp_path):
    model, tokenizer = new_tiny_lm()
    adapted = add_lora(model, LoRAConfig(rank=4))
    set_b_nonzero(adapted)
    with torch.no_grad():
        expected = adapted(IDS).logits
        plain = merged(adapted)
        assert type(plain).__name__ == "LlamaForCausalLM"
        assert not [n for n, _ in plain.named_parameters() if "lora_" in n]
        torch.testing.assert_close(plain(IDS).logits, expected, rtol=1e-5, atol=1e-5)
        save_lm(plain, tokenizer, tmp_path / "merged")
        reloaded, _ = load_lm(tmp_path / "merged")
        assert torch.equal(reloaded(IDS).logits, plain(IDS).logits)


def test_the_adapters_off_reference_is_the_base_model_exactly_after_training():
    model, tokenizer = new_tiny_lm(embedding_scale=4.0)
    plain, _ = new_tiny_lm(embedding_scale=4.0)  # an unadapted copy of the same base
    torch.manual_seed(3)
    policy = LMPolicy(add_lora(model, LoRAConfig(rank=4)), tokenizer)
    reference, base = AdapterDisabled(policy), LMPolicy(plain, tokenizer)
    rollout = policy.rollout(["1+2=", "7-3="], SamplingConfig(max_new_tokens=4), torch.Generator().manual_seed(0), 2)

    optimizer = torch.optim.AdamW(policy.trainable_parameters(), lr=1e-2)
    policy.train()
    policy.logprobs(rollout, 1.0).sum().backward()  # one step up the log-likelihood: B leaves zero
    optimizer.step()
    policy.train(False)

    with torch.no_grad():
        expected = base.logprobs(rollout, 1.0)
        assert torch.equal(reference.logprobs(rollout, 1.0), expected)
        assert not torch.allclose(policy.logprobs(rollout, 1.0), expected, atol=1e-4)  # the adapters trained
        assert torch.equal(policy.logprobs(rollout, 1.0), policy.logprobs(rollout, 1.0))  # and are back on
    frozen = [p for n, p in policy.model.named_parameters() if "lora_" not in n]
    assert all(torch.equal(a, b) for a, b in zip(frozen, plain.parameters(), strict=True))  # the base never moved


def test_sft_then_grpo_with_lora_train_only_the_adapters_and_save_them_beside_the_merged_model(tmp_path):
    """The real stages in a throwaway project (tiny params, as tests/test_ddp.py runs them) with model.adapter lora:
    each output directory holds the merged model, <it>/adapter the adapter that peft applies to its input model."""
    from latentlab.lm.modeling import read_manifest
    from tests.dag import ROOT, TINY
    from tests.test_ddp import set_params, stage

    shutil.copy(ROOT / "params.yaml", tmp_path / "params.yaml")
    set_params(tmp_path, **TINY, device="cpu")
    lora = {"rank": 4, "alpha": 8.0, "dropout": 0.0, "target_modules": None}
    set_params(tmp_path, model={"adapter": "lora", "lora": lora}, grpo={"beta": 0.1})  # beta: the reference runs
    model, tokenizer = new_tiny_lm(max_positions=TINY["model"]["max_positions"])
    expected = sum(4 * sum(shape(layer)) for layer in targeted(model, DEFAULT_TARGETS["llama"]).values())
    save_lm(model, tokenizer, tmp_path / "models" / "base")
    for name in ("synth", "sft", "grpo"):
        stage(tmp_path, name)

    for parent, child in (("base", "sft"), ("sft", "grpo")):
        before, after = tmp_path / "models" / parent, tmp_path / "models" / child
        adapter = json.loads((after / "adapter" / MANIFEST).read_text())
        assert adapter["base_sha256"] == read_manifest(before)["content_sha256"] == read_manifest(after)["parent"]
        assert adapter["trained_parameters"] == read_manifest(after)["trained_parameters"] == expected
        start, _ = load_lm(before)
        trained, _ = load_lm(after)
        untouched = [n for n, _ in start.named_parameters() if n.rsplit(".", 2)[-2] not in DEFAULT_TARGETS["llama"]]
        assert untouched  # embeddings and norms: equal to the bit, only the targeted projections moved
        assert all(torch.equal(start.get_parameter(n), trained.get_parameter(n)) for n in untouched), child
        assert not torch.equal(
            start.model.layers[0].self_attn.q_proj.weight, trained.model.layers[0].self_attn.q_proj.weight
        )
        with torch.no_grad():
            merged_logits = trained(IDS).logits
            torch.testing.assert_close(
                PeftModel.from_pretrained(start, after / "adapter")(IDS).logits, merged_logits, rtol=1e-5, atol=1e-5
            )
