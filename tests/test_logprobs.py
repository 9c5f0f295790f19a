"""Chunked selected-token log-probs (lm/logprobs.py): bitwise today's full log_softmax on every caller's path."""

import pytest
import torch

import latentlab.policies.lm_policy as lm_policy
from latentlab.lm.logprobs import head_logprobs, selected_logprobs, tempered_logprobs
from latentlab.lm.sampling import SamplingConfig, completion_logprobs, teacher_forced_logits
from latentlab.policies.injection import InjectionPolicy, InjectorConfig, build_injector
from latentlab.policies.lm_policy import LMPolicy
from latentlab.policies.nla_actor import NLAActor, NLAActorConfig, VectorInjector
from latentlab.policies.value_head import ValueHead, logprobs_and_values
from latentlab.rl.surgeon import probe
from tests.tiny import new_tiny_lm

PROMPTS = ["3+4=", "12-5=", "40+9=", "1+1=", "48-47="]


def _full_logprobs(model, prefix_embeds, prefix_mask, completions, temperature=1.0, group_size=1):
    """Before chunking: one (B, T, V) float32 log_softmax of the teacher-forced logits, gathered."""
    logits = teacher_forced_logits(model, prefix_embeds, prefix_mask, completions, group_size)
    return tempered_logprobs(logits, temperature).gather(-1, completions.ids[..., None]).squeeze(-1) * completions.mask


def _lm():
    return LMPolicy(*new_tiny_lm())


def _injection(variant):
    def build():
        model, tokenizer = new_tiny_lm(embedding_scale=4.0)
        injector = build_injector(model, InjectorConfig(variant=variant), tokenizer)
        torch.manual_seed(1)
        for p in injector.parameters():
            torch.nn.init.normal_(p, std=0.2)
        return InjectionPolicy(model, tokenizer, injector)

    return build


def _nla():
    model, tokenizer = new_tiny_lm(embedding_scale=4.0)
    torch.manual_seed(3)
    cfg = NLAActorConfig(mode="replace", layers=[0], center=False)
    return NLAActor(model, tokenizer, VectorInjector(32, 32, cfg, [4.0], torch.zeros(32)))


def _prompts(policy):
    if isinstance(policy, NLAActor):
        return list(torch.randn(3, 32, generator=torch.Generator().manual_seed(0)).numpy())
    return PROMPTS[:3]


def _run(policy, rollout, temperature, score):
    """(log-probs, every trainable parameter's gradient) of a sin-weighted sum of `score(rollout)`."""
    for p in policy.trainable_parameters():
        p.grad = None
    logprobs = score(rollout)
    weights = torch.arange(logprobs.numel(), dtype=torch.float32).view_as(logprobs).sin()
    (logprobs * weights).sum().backward()
    return logprobs.detach(), [p.grad.clone() for p in policy.trainable_parameters()]


@pytest.mark.parametrize("G", [1, 3])
@pytest.mark.parametrize(
    "build", [_lm, _injection("residual"), _injection("gated"), _nla], ids=["lm", "inject", "gated", "nla"]
)
def test_every_policy_path_is_bitwise_the_full_log_softmax(build, G, monkeypatch):
    """Each policy's `logprobs` (its hooks, gates and grouped prefix) gives the values and gradients of the
    full (B, T, V) log_softmax bit for bit on the scratch model (one chunk: the model's own head call)."""
    policy = build()
    policy.train(False)
    rollout = policy.rollout(_prompts(policy), SamplingConfig(max_new_tokens=7, temperature=1.3),
                             torch.Generator().manual_seed(0), group_size=G)  # fmt: skip
    policy.train(True)
    new = _run(policy, rollout, 1.3, lambda r: policy.logprobs(r, 1.3))
    monkeypatch.setattr(lm_policy, "completion_logprobs", _full_logprobs)
    old = _run(policy, rollout, 1.3, lambda r: policy.logprobs(r, 1.3))
    assert torch.equal(new[0], old[0]) and (new[0] != 0).sum() == rollout.completions.mask.sum()
    assert all(torch.equal(a, b) for a, b in zip(new[1], old[1], strict=True))


def test_ppo_values_and_the_surgeon_probe_are_unchanged(monkeypatch):
    policy = _lm()
    rollout = policy.rollout(PROMPTS, SamplingConfig(max_new_tokens=6), torch.Generator().manual_seed(2))
    head = ValueHead(32)
    torch.nn.init.normal_(head.linear.weight)
    model, tokenizer = policy.model, policy.tokenizer
    new = logprobs_and_values(policy, head, rollout, 1.0), probe(model, tokenizer, PROMPTS, ["7", "7", "49", "2", "1"])
    monkeypatch.setattr(lm_policy, "completion_logprobs", _full_logprobs)
    monkeypatch.setattr("latentlab.rl.surgeon.completion_logprobs", _full_logprobs)
    old = logprobs_and_values(policy, head, rollout, 1.0), probe(model, tokenizer, PROMPTS, ["7", "7", "49", "2", "1"])
    assert all(torch.equal(a, b) for a, b in zip(new[0], old[0], strict=True))
    assert torch.equal(new[1][0], old[1][0]) and new[1][1] == old[1][1]


def test_row_chunks_of_given_logits_are_bitwise():
    logits = torch.randn(4, 9, 50, generator=torch.Generator().manual_seed(0))
    tokens = torch.randint(50, (4, 9), generator=torch.Generator().manual_seed(1))
    full = tempered_logprobs(logits, 0.7).gather(-1, tokens[..., None]).squeeze(-1)
    for rows in (1, 2, 5, 36, 100):
        assert torch.equal(selected_logprobs(logits, tokens, 0.7, rows), full)


@pytest.mark.parametrize("G", [1, 3])
def test_small_chunks_give_the_same_values_and_gradients(G):
    """Several chunks (checkpointed with gradients): the same log-probs and gradients up to the head's
    rounding on fewer rows."""
    model, tokenizer = new_tiny_lm()
    policy = LMPolicy(model, tokenizer)
    rollout = policy.rollout(PROMPTS, SamplingConfig(max_new_tokens=7), torch.Generator().manual_seed(0), G)
    embeds, mask = policy.prefix(rollout.heads() if G > 1 else rollout)
    results = []
    for rows in (None, 1, 4):
        model.zero_grad(set_to_none=True)
        logprobs = completion_logprobs(model, embeds, mask, rollout.completions, 1.0, G, rows)
        (logprobs * torch.arange(logprobs.numel()).view_as(logprobs).sin()).sum().backward(retain_graph=True)
        results.append((logprobs.detach(), [p.grad.clone() for p in model.parameters()]))
    for values, grads in results[1:]:
        torch.testing.assert_close(values, results[0][0], atol=1e-6, rtol=1e-6)
        for a, b in zip(grads, results[0][1], strict=True):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_chunks_keep_no_full_logits_for_backward():
    """With gradients, the chunks' logits are recomputed in the backward pass: what autograd saves does not
    grow with the vocabulary (a (N, V) float32 log_softmax output would be saved without checkpointing)."""
    head = torch.nn.Linear(16, 5000, bias=False)
    states = torch.randn(2, 40, 16, requires_grad=True)
    tokens = torch.randint(5000, (2, 40))
    saved = []

    def pack(tensor):
        saved.append(tensor.numel())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        head_logprobs(head, states, tokens, 1.0, rows=8).sum().backward()
    assert max(saved) < 8 * 5000 + 1  # a chunk at most, during its recomputation
    assert states.grad is not None and head.weight.grad is not None
