"""Low-precision training (latentlab/common/precision.py): activation checkpointing changes no gradient, fp32 master
weights keep a bf16 model on its fp32 course, the fp32 optimizer is today's bit for bit, and a bf16 GRPO step."""

import copy

import pytest
import torch

from latentlab.common.optim import build_optimizer, lr_factor
from latentlab.common.precision import MasterWeights, enable_gradient_checkpointing, weight_dtype
from latentlab.policies.lm_policy import LMPolicy
from latentlab.rl.grpo import GRPOConfig, GRPOTrainer
from tests.tiny import new_tiny_lm


def batch(tokenizer, texts=("12+30=42", "7-5=2", "40+9=49")):
    encoded = tokenizer(list(texts), return_tensors="pt", padding=True)
    labels = encoded.input_ids.masked_fill(encoded.attention_mask == 0, -100)
    return {**encoded, "labels": labels}


def gradients(model, inputs) -> dict[str, torch.Tensor]:
    model.train()
    model.zero_grad(set_to_none=True)
    model(**inputs).loss.backward()
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}


def assert_same_gradients(plain, checkpointed):
    assert plain.keys() == checkpointed.keys() and plain
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], rtol=1e-5, atol=1e-7, msg=name)


def test_weight_dtype_parses_the_param():
    assert weight_dtype("float32") is torch.float32 and weight_dtype("bfloat16") is torch.bfloat16
    with pytest.raises(ValueError, match="float32"):
        weight_dtype("fp16")


def test_checkpointing_gives_the_same_gradients():
    model, tokenizer = new_tiny_lm()
    inputs = batch(tokenizer)
    plain = gradients(model, inputs)
    enable_gradient_checkpointing(model)
    assert model.is_activation_checkpointing
    assert_same_gradients(plain, gradients(model, inputs))


def test_checkpointing_gives_the_same_lora_gradients():
    """Frozen embeddings: non-reentrant checkpointing needs no input that requires grad to reach the adapters."""
    from peft import LoraConfig, get_peft_model

    model, tokenizer = new_tiny_lm()
    inputs = batch(tokenizer)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    plain_model = get_peft_model(model, lora)  # random B too: every adapter weight gets a gradient
    checkpointed_model = copy.deepcopy(plain_model)
    plain = gradients(plain_model, inputs)
    assert all("lora_" in name for name in plain)
    enable_gradient_checkpointing(checkpointed_model)
    assert checkpointed_model.is_activation_checkpointing
    assert_same_gradients(plain, gradients(checkpointed_model, inputs))


def test_checkpointed_group_logprobs_run_without_the_shared_cache():
    """GRPO scores a group's shared prefix once through a KV cache, which checkpointed blocks drop in train mode:
    there the prefix runs per row, to the same log-probs and gradients."""
    from latentlab.lm.sampling import SamplingConfig

    model, tokenizer = new_tiny_lm()
    policy = LMPolicy(model, tokenizer)
    rollout = policy.rollout(["1+2=", "30-4="], SamplingConfig(max_new_tokens=4), torch.Generator().manual_seed(0), 2)
    model.train()
    plain = policy.logprobs(rollout, 1.0)
    plain.sum().backward()
    plain_grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    enable_gradient_checkpointing(model)
    checkpointed = policy.logprobs(rollout, 1.0)
    checkpointed.sum().backward()
    torch.testing.assert_close(checkpointed, plain, rtol=1e-5, atol=1e-6)
    assert_same_gradients(plain_grads, {name: p.grad for name, p in model.named_parameters()})


def train(model, inputs, build, steps: int = 3, lr: float = 1e-3):
    optimizer, schedule = build(list(model.parameters()), lr, steps, 1, 0.01)
    model.train()
    for _ in range(steps):
        optimizer.zero_grad(set_to_none=True)
        model(**inputs).loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
    return optimizer


def plain_adamw(params, lr, steps, warmup_steps=0, weight_decay=0.0):
    """AdamW stepping the parameters as they are, whatever their dtype (pure bf16 AdamW for bf16 ones)."""
    optimizer = torch.optim.AdamW(list(params), lr=lr, weight_decay=weight_decay)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(steps, warmup_steps))


def error(weights, reference, start) -> float:
    """How far `weights` ended from `reference`'s trained weights, relative to how far `reference` moved from
    `start` (all read in fp32): 0 is fp32 training exactly, 1 an error as large as the whole update."""
    triples = list(zip(weights, reference.parameters(), start.parameters(), strict=True))
    missed = sum((w.float() - r).square().sum() for w, r, _ in triples)
    update = sum((r - s.float()).square().sum() for _, r, s in triples)
    return (missed / update).sqrt().item()


def test_master_weights_track_fp32_training_where_bf16_adamw_does_not():
    """lr 1e-4: AdamW's update (~lr per element) is near half a bf16 ulp of the tiny model's weights, so pure bf16
    AdamW rounds much of it away; the fp32 masters accumulate it and the bf16 weights follow (what remains is the
    bf16 forward's gradients and the final rounding). Measured: masters 0.14, their bf16 weights 0.17, pure 0.39."""
    reference, tokenizer = new_tiny_lm()
    inputs = batch(tokenizer)
    start = copy.deepcopy(reference).to(torch.bfloat16)
    train(reference, inputs, build_optimizer, lr=1e-4)
    mastered, pure = copy.deepcopy(start), copy.deepcopy(start)
    optimizer = train(mastered, inputs, build_optimizer, lr=1e-4)
    train(pure, inputs, plain_adamw, lr=1e-4)
    assert isinstance(optimizer, MasterWeights)
    assert all(m.dtype == torch.float32 for m in optimizer.masters)
    assert all(p.dtype == torch.float32 for group in optimizer.param_groups for p in group["params"])
    assert all(p.dtype == torch.bfloat16 for p in mastered.parameters())
    pure_error = error(pure.parameters(), reference, start)
    assert error(optimizer.masters, reference, start) < 0.5 * pure_error
    assert error(mastered.parameters(), reference, start) < 0.6 * pure_error


def test_master_weights_step_fp32_params_in_place():
    """A fp32 parameter among bf16 ones (a head, an adapter) is its own master: the same tensor, stepped as ever."""
    model, tokenizer = new_tiny_lm()
    model.model.layers.to(torch.bfloat16)
    head = torch.nn.Parameter(torch.randn(4))
    params = list(model.model.layers.parameters()) + [head]
    optimizer, _ = build_optimizer(params, 1e-2, 3, 0)
    assert optimizer.masters[-1] is head
    head.grad = torch.ones(4)
    before = head.detach().clone()
    optimizer.step()
    assert not torch.equal(head, before) and torch.equal(head.grad, torch.ones(4))


def test_fp32_optimizer_is_todays_bit_for_bit():
    model, tokenizer = new_tiny_lm()
    inputs = batch(tokenizer)
    today = copy.deepcopy(model)
    optimizer, _ = build_optimizer(list(model.parameters()), 1e-3, 3, 1, 0.01)
    assert type(optimizer) is torch.optim.AdamW
    train(model, inputs, build_optimizer)
    train(today, inputs, plain_adamw)
    for p, q in zip(model.parameters(), today.parameters(), strict=True):
        assert torch.equal(p, q)


def test_a_bf16_grpo_step_runs_on_the_cpu():
    model, tokenizer = new_tiny_lm()
    model.to(torch.bfloat16)
    before = [p.detach().clone() for p in model.parameters()]
    cfg = GRPOConfig(steps=1, prompts_per_step=2, group_size=2, max_new_tokens=3, lr=1e-2)

    def varied(completions, targets):  # distinct rewards within a group: a nonzero advantage
        return [float(i % 2) for i in range(len(completions))]

    trainer = GRPOTrainer(LMPolicy(model, tokenizer), varied, cfg, torch.Generator().manual_seed(0))
    assert isinstance(trainer.learner.optimizer, MasterWeights)  # fp32 masters of the bf16 weights
    row = trainer.step(0, ["1+2=", "30-4="], [3, 26])
    assert torch.isfinite(torch.tensor(row["loss"]))
    after = list(model.parameters())
    assert all(p.dtype == torch.bfloat16 for p in after)
    assert any(not torch.equal(p, q) for p, q in zip(after, before, strict=True))
