"""The injection variants' step-0 properties (gated = the SFT model, norm = the set norm, token = the
embedding), the gated KV cache, the alignment loss, SFT with a placeholder and the shuffled control."""

import json

import pytest
import torch

from latentlab.common.tracking import StepLog
from latentlab.lm.capture import edit_block_input
from latentlab.lm.modeling import save_lm
from latentlab.lm.sampling import SamplingConfig
from latentlab.lm.tokenizer import INJECT
from latentlab.lm.training import prompt_answer_examples, shuffled_batches
from latentlab.policies.alignment import align_injector, alignment_loss, answer_rollout
from latentlab.policies.injection import InjectionPolicy, InjectorConfig, build_injector, derangement, save_injector
from latentlab.policies.lm_policy import LMPolicy
from latentlab.policies.loading import load_policy
from latentlab.policies.placeholder import PlaceholderLM, add_placeholders, placeholder_vector
from tests.tiny import new_tiny_lm

PROMPTS = ["3+4=", "12-5=", "40+9=", "1+1=", "48-47="]
ANSWERS = ["7", "7", "49", "2", "1"]


def _policy(perturb: bool = False, embedding_scale: float = 1.0, **cfg) -> InjectionPolicy:
    """An injection policy on the tiny model; `perturb` moves the injector off its start (gate included)."""
    model, tokenizer = new_tiny_lm(embedding_scale)
    injector = build_injector(model, InjectorConfig(**cfg), tokenizer)
    if perturb:
        torch.manual_seed(1)
        torch.nn.init.normal_(injector.mlp[-1].weight, std=0.3)
        if cfg.get("variant") == "gated":
            injector.gate.data.fill_(0.7)
    return InjectionPolicy(model, tokenizer, injector)


def _prompt_ids(policy, prompt: str) -> torch.Tensor:
    return torch.tensor([policy.tokenizer(prompt, add_special_tokens=False)["input_ids"]])


def test_gated_at_step_0_is_the_sft_model_bit_for_bit_and_its_gate_gets_a_gradient():
    policy = _policy(variant="gated")
    rollout = answer_rollout(policy, PROMPTS, ANSWERS)
    logits = policy.completion_logits(rollout)  # (B, T, V) with the gate's hook in the pass
    with torch.no_grad():  # the same pass with no hook at all
        embeds = policy.model.get_input_embeddings()(torch.cat([rollout.prompt_ids, rollout.completions.ids], 1))
        mask = torch.cat([rollout.prompt_mask, rollout.completions.mask.long()], 1)
        plain = policy.model(inputs_embeds=embeds, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0))
    length = rollout.completions.ids.shape[1]
    assert torch.equal(logits, plain.logits[:, -length - 1 : -1])
    assert policy.generate(PROMPTS, 4) == LMPolicy(policy.model, policy.tokenizer).generate(PROMPTS, 4)

    # d loss / d g = ||x|| v/||v|| . d loss / d x at g = 0: not zero, so GRPO can open the gate
    logits.logsumexp(-1).sum().backward()
    assert policy.injector.gate.grad is not None and policy.injector.gate.grad.abs().item() > 1e-6
    assert len(policy.trainable_parameters()) == 7  # three Linear layers and the gate


@torch.no_grad()
def test_gated_sampling_log_probs_match_the_teacher_forced_pass_and_a_slow_reference():
    policy = _policy(perturb=True, variant="gated", gate_layer=1)
    rollout = policy.rollout(
        PROMPTS, SamplingConfig(max_new_tokens=6, temperature=0.8), torch.Generator().manual_seed(0)
    )
    teacher_forced = policy.logprobs(rollout, 0.8)
    embed = policy.model.get_input_embeddings()
    for row, prompt in enumerate(PROMPTS):
        ids = _prompt_ids(policy, prompt)
        h = policy.model(input_ids=ids, output_hidden_states=True).hidden_states[-1][:, -1]
        column = ids.shape[1] - 1

        def by_hand(
            x: torch.Tensor, positions, h=h, column=column
        ) -> torch.Tensor:  # the formula at the last prompt position
            v, x = policy.injector(h), x.clone()
            x[:, column] += policy.injector.gate * x[:, column].norm(dim=-1, keepdim=True) * v / v.norm()
            return x

        for t in range(int(rollout.completions.mask[row].sum())):
            # no padding, no cache: [prompt, completion[:t]] from scratch, the last logits score token t
            sequence = torch.cat([embed(ids), embed(rollout.completions.ids[row : row + 1, :t])], dim=1)
            with edit_block_input(policy.model, 1, by_hand):
                logits = policy.model(inputs_embeds=sequence).logits[0, -1]
            expected = torch.log_softmax(logits / 0.8, -1)[rollout.completions.ids[row, t]].item()
            assert rollout.completions.logprobs[row, t].item() == pytest.approx(expected, abs=1e-4)
            assert teacher_forced[row, t].item() == pytest.approx(expected, abs=1e-4)
    # the gate really acts: the same rows without it score differently
    plain = LMPolicy.logprobs(policy, rollout, 0.8)  # the unhooked pass
    assert not torch.allclose(plain, teacher_forced, atol=1e-3)


@torch.no_grad()
def test_norm_variant_has_exactly_the_set_norm_and_defaults_to_the_embedding_rows_mean_norm():
    h = torch.randn(6, 32) * 5
    policy = _policy(perturb=True, variant="norm", scale=3.5)
    torch.testing.assert_close(policy.injector(h).norm(dim=-1), torch.full((6,), 3.5), rtol=1e-6, atol=0)
    default = _policy(variant="norm")
    rows = default.model.get_input_embeddings().weight.norm(dim=-1).mean()
    torch.testing.assert_close(default.injector(h).norm(dim=-1), rows.expand(6), rtol=1e-6, atol=0)
    torch.testing.assert_close(torch.cosine_similarity(default.injector(h), h), torch.ones(6))  # step 0: h's direction


@torch.no_grad()
def test_token_variant_starts_exactly_at_the_tokens_embedding():
    policy = _policy(variant="token", init_token="=")
    h = torch.randn(4, 32) * 3
    row = policy.model.get_input_embeddings().weight[policy.tokenizer.convert_tokens_to_ids("=")]
    assert torch.equal(policy.injector(h), row.expand(4, -1))
    assert policy.injector.residual(h).abs().max().item() == 0.0  # no L2 pull at the start
    mean = _policy(variant="token").injector(h)
    assert torch.equal(mean, policy.model.get_input_embeddings().weight.mean(0).expand(4, -1))
    with pytest.raises(ValueError, match="one token"):
        _policy(variant="token", init_token="12")


def test_alignment_kl_is_zero_for_the_teacher_itself_and_falls_with_training():
    gated = _policy(variant="gated")
    assert alignment_loss(gated, answer_rollout(gated, PROMPTS, ANSWERS)).item() == 0.0

    policy = _policy(embedding_scale=10.0)  # sharp logits, and an injector far from its start: a large KL
    torch.manual_seed(1)
    torch.nn.init.normal_(policy.injector.mlp[-1].weight, std=3.0)
    rollout = answer_rollout(policy, PROMPTS, ANSWERS)
    before = alignment_loss(policy, rollout).item()
    log = StepLog()
    result = align_injector(policy, lambda: (PROMPTS, ANSWERS), 20, 3e-2, 1.0, log)
    after = alignment_loss(policy, rollout).item()
    assert before > 1.0 and after < 0.5 * before, (before, after)
    assert result["align_final_kl"] == pytest.approx(log.rows[-1]["kl"]) and len(log.rows) == 20
    assert all(p.grad is None for p in policy.model.parameters())


def test_placeholder_sft_batches_share_one_and_share_zero():
    model, tokenizer = new_tiny_lm()
    inject_id = tokenizer.convert_tokens_to_ids(INJECT)
    examples = prompt_answer_examples(tokenizer, PROMPTS, ANSWERS)
    every = add_placeholders(examples, 1.0, inject_id, torch.Generator().manual_seed(0))
    for (sequence, target), (old, old_target) in zip(zip(*every), zip(*examples)):
        end = old_target.index(1)
        assert sequence == [*old[:end], inject_id, *old[end:]] and target == [*old_target[:end], 0, *old_target[end:]]
    none = add_placeholders(examples, 0.0, inject_id, torch.Generator().manual_seed(0))
    assert none == examples
    plain = shuffled_batches(examples, 2, tokenizer.pad_token_id, torch.Generator().manual_seed(3))
    same = shuffled_batches(none, 2, tokenizer.pad_token_id, torch.Generator().manual_seed(3))
    for _ in range(6):
        a, b = next(plain), next(same)
        assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.loss_mask, b.loss_mask)

    # the wrapped model: rows without <INJECT> are the model; at <INJECT> the input is the step-0 vector
    wrapped = PlaceholderLM(model, inject_id, "residual", -1)
    batch = next(shuffled_batches(every, 5, tokenizer.pad_token_id, torch.Generator().manual_seed(0)))
    plain_batch = next(shuffled_batches(examples, 5, tokenizer.pad_token_id, torch.Generator().manual_seed(0)))
    with torch.no_grad():
        assert torch.equal(
            wrapped(plain_batch.input_ids, plain_batch.attention_mask).logits,
            model(input_ids=plain_batch.input_ids, attention_mask=plain_batch.attention_mask).logits,
        )
        seen = []
        with edit_block_input(model, 0, lambda x, positions: seen.append(x)):  # record the embeddings of every pass
            wrapped(batch.input_ids, batch.attention_mask)
        seen = {"x": seen[-1]}  # the second, trained pass
    row, column = 0, int((batch.input_ids[0] == inject_id).nonzero())
    prompt = batch.input_ids[row : row + 1, :column]
    h = model(input_ids=prompt, output_hidden_states=True).hidden_states[-1][0, -1]
    torch.testing.assert_close(seen["x"][row, column], h, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("variant", ["residual", "norm", "token"])
@torch.no_grad()
def test_placeholder_vector_is_the_injectors_step_0_output(variant):
    model, tokenizer = new_tiny_lm()
    h = torch.randn(5, 32) * 4
    injector = build_injector(model, InjectorConfig(variant=variant), tokenizer)
    torch.testing.assert_close(
        placeholder_vector(variant, h, model.get_input_embeddings().weight), injector(h), atol=1e-6, rtol=1e-6
    )


def test_shuffled_control_reads_another_prompts_state_and_keeps_groups_together(tmp_path):
    prompts = [p for p in PROMPTS for _ in range(3)]  # groups of 3 copies
    plain, shuffled = _policy(), _policy(shuffle_hidden=True)
    a, b = plain.encode(prompts), shuffled.encode(prompts)
    plain.prepare(a)
    shuffled.prepare(b)
    own, read = a.extras["hidden"], b.extras["hidden"]
    for row in range(len(prompts)):
        assert not torch.allclose(read[row], own[row])  # never its own prompt's state
        source = [r for r in range(len(prompts)) if torch.equal(own[r], read[row])]
        assert source and prompts[source[0]] != prompts[row]
    for group in range(len(PROMPTS)):
        assert all(torch.equal(read[3 * group], read[3 * group + i]) for i in range(3))
    order = derangement(a.prompt_ids)
    assert sorted(set(order.tolist())) == [0, 3, 6, 9, 12]
    with pytest.raises(ValueError, match="two distinct prompts"):
        derangement(a.prompt_ids[:3])

    # evaluate applies it too: the flag travels in injector.json
    save_lm(shuffled.model, shuffled.tokenizer, tmp_path / "sft")
    save_injector(shuffled.injector, tmp_path / "inject", base=tmp_path / "sft")
    assert load_policy(tmp_path / "inject").injector.cfg.shuffle_hidden


@pytest.mark.parametrize(
    "cfg",
    [
        {},
        {"variant": "gated", "gate_layer": 1},
        {"variant": "norm", "scale": 2.0},
        {"variant": "token", "init_token": "="},
    ],
)
def test_every_variant_saves_and_loads(cfg, tmp_path):
    policy = _policy(perturb=True, **cfg)
    save_lm(policy.model, policy.tokenizer, tmp_path / "sft")
    save_injector(policy.injector, tmp_path / "inject", base=tmp_path / "sft")
    stored = json.loads((tmp_path / "inject" / "injector.json").read_text())["injector"]
    assert set(stored) - set(InjectorConfig.model_fields) == set()
    if not cfg:  # a residual injector's file is the one written before the variants existed
        assert set(stored) == {"layer", "bottleneck", "width", "output_norm"}
    loaded = load_policy(tmp_path / "inject")
    assert loaded.injector.cfg == policy.injector.cfg
    for name, value in policy.injector.state_dict().items():
        assert torch.equal(loaded.injector.state_dict()[name], value), name
    assert loaded.generate(PROMPTS, 4) == policy.generate(PROMPTS, 4)


@pytest.mark.parametrize("variant", ["residual", "gated", "norm", "token"])
@pytest.mark.parametrize("shuffle", [False, True])
def test_every_variant_scores_grouped_rollouts_as_it_sampled_them(variant, shuffle):
    # GRPO samples G completions per prompt with the prompt's prefix (and the gate's edit) run once per
    # group; the teacher-forced pass must score exactly what was sampled, row for row
    policy = _policy(perturb=True, variant=variant, shuffle_hidden=shuffle)
    sampling = SamplingConfig(max_new_tokens=4, temperature=0.8)
    rollout = policy.rollout(PROMPTS, sampling, torch.Generator().manual_seed(0), group_size=3)
    assert rollout.completions.ids.shape[0] == len(PROMPTS) * 3 and rollout.group_size == 3
    with torch.no_grad():
        scored = policy.logprobs(rollout, 0.8)
    torch.testing.assert_close(scored, rollout.completions.logprobs, atol=1e-5, rtol=1e-4)
