"""GRPO advantages and loss against hand-computed values, masking, and a real short training run."""

import copy
import math

import pytest
import torch

from latentlab.common.errors import NonFiniteLogitsError
from latentlab.common.execution import Loop, plain_means
from latentlab.lm.sampling import tokenize_prompts
from latentlab.policies.lm_policy import LMPolicy
from latentlab.rl.grpo import GRPOConfig, GRPOTrainer, group_advantages, grpo_counts, grpo_loss


def mean_grpo_loss(logprobs, old, advantages, mask, *args, **kwargs):
    """`grpo_loss` as one process with one shard minimises (the objective) and logs it (the stats' means)."""
    return plain_means(grpo_loss(logprobs, old, advantages, mask, *args, **kwargs), grpo_counts(mask))


def test_advantages_are_group_normalised_by_hand():
    # group 1: rewards 3, 1, 2, 2 -> mean 2, deviations 1, -1, 0, 0, unbiased var 2/3, std 0.816497
    # group 2: all equal -> advantage 0 (no signal, no division by zero)
    rewards = torch.tensor([3.0, 1.0, 2.0, 2.0, 5.0, 5.0, 5.0, 5.0])
    advantages = group_advantages(rewards, group_size=4, scale=True, eps=0.0 + 1e-4)
    std = math.sqrt(2 / 3)
    expected = [1 / (std + 1e-4), -1 / (std + 1e-4), 0, 0, 0, 0, 0, 0]
    assert advantages.tolist() == pytest.approx(expected, abs=1e-6)


def test_advantages_without_std_scaling_are_mean_centred():
    advantages = group_advantages(torch.tensor([1.0, 0.0, 0.5, 0.5]), group_size=2, scale=False)
    assert advantages.tolist() == pytest.approx([0.5, -0.5, 0.0, 0.0])


def test_advantages_need_whole_groups():
    with pytest.raises(ValueError, match="groups of 4"):
        group_advantages(torch.zeros(6), group_size=4)


def _two_rows():
    # row 0: A=+1, ratios 1.5, 1.0, (masked);  row 1: A=-2, ratios 0.7, 1.1, 1.0
    old = torch.zeros(2, 3)
    logprobs = torch.log(torch.tensor([[1.5, 1.0, 0.5], [0.7, 1.1, 1.0]]))
    advantages = torch.tensor([1.0, -2.0])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]], dtype=torch.bool)
    return logprobs, old, advantages, mask


def test_clipped_loss_matches_hand_computation():
    logprobs, old, advantages, mask = _two_rows()
    # per-token -min(r A, clip(r, 0.8, 1.2) A):
    #   row 0: r=1.5 -> -min(1.5, 1.2) = -1.2;  r=1 -> -1
    #   row 1: r=0.7 -> -min(-1.4, -1.6) = 1.6;  r=1.1 -> -min(-2.2, -2.2) = 2.2;  r=1 -> 2
    loss, stats = mean_grpo_loss(logprobs, old, advantages, mask, clip_eps=0.2, aggregation="sequence")
    assert loss.item() == pytest.approx(((-1.2 - 1.0) / 2 + (1.6 + 2.2 + 2.0) / 3) / 2, rel=1e-6)
    token_loss, _ = mean_grpo_loss(logprobs, old, advantages, mask, clip_eps=0.2, aggregation="token")
    assert token_loss.item() == pytest.approx((-1.2 - 1.0 + 1.6 + 2.2 + 2.0) / 5, rel=1e-6)
    # clipped: row 0 token 0 (r > 1.2, A > 0) and row 1 token 0 (r < 0.8, A < 0) out of 5 tokens
    assert stats["clip_fraction"] == pytest.approx(2 / 5)
    assert stats["kl"] == 0.0


def test_k3_kl_penalty_matches_hand_computation():
    logprobs = torch.log(torch.tensor([[0.5]]))
    ref = torch.log(torch.tensor([[1.0]]))  # log(pi_ref / pi) = log 2
    loss, stats = mean_grpo_loss(
        logprobs,
        logprobs.clone(),
        torch.tensor([0.0]),
        torch.ones(1, 1, dtype=torch.bool),
        clip_eps=0.2,
        beta=0.1,
        ref_logprobs=ref,
    )
    kl = 2 - math.log(2) - 1  # e^d - d - 1 with d = log 2
    assert stats["kl"] == pytest.approx(kl, rel=1e-6)
    assert loss.item() == pytest.approx(0.1 * kl, rel=1e-6)


def test_tokens_after_eos_do_not_move_the_loss_or_get_gradient():
    torch.manual_seed(0)
    logprobs = torch.randn(4, 6).requires_grad_()
    old = logprobs.detach() + 0.1 * torch.randn(4, 6)
    advantages = torch.randn(4)
    mask = torch.tensor([[1] * 6, [1] * 3 + [0] * 3, [1] + [0] * 5, [1] * 5 + [0]], dtype=torch.bool)
    loss, _ = mean_grpo_loss(logprobs, old, advantages, mask, clip_eps=0.2)
    loss.backward()
    assert torch.all(logprobs.grad[~mask] == 0)
    assert torch.all(logprobs.grad[mask] != 0)
    changed = logprobs.detach().clone()
    changed[~mask] = 123.0
    assert mean_grpo_loss(changed, old, advantages, mask, clip_eps=0.2)[0].item() == pytest.approx(loss.item())


def test_unclipped_gradient_is_minus_advantage_over_length():
    logprobs = torch.zeros(1, 4, requires_grad=True)
    mask = torch.ones(1, 4, dtype=torch.bool)
    mean_grpo_loss(logprobs, logprobs.detach(), torch.tensor([2.0]), mask, clip_eps=0.2)[0].backward()
    # d/dlogp of -(1/|o|) * sum r A with r = 1 at pi = pi_old is -A/|o|
    assert logprobs.grad[0].tolist() == pytest.approx([-0.5] * 4)


def test_beta_without_reference_is_refused(tiny_lm):
    model, tokenizer = tiny_lm
    cfg = GRPOConfig(steps=1, prompts_per_step=1, max_new_tokens=2, lr=1e-3, beta=0.1)
    with pytest.raises(ValueError, match="reference"):
        GRPOTrainer(LMPolicy(model, tokenizer), lambda c, t: [0.0] * len(c), cfg, torch.Generator())


def test_short_grpo_run_raises_the_reward():
    """A real run on a fresh tiny model: reward = share of '7' characters in the completion."""
    from latentlab.common.tracking import StepLog
    from tests.tiny import new_tiny_lm

    model, tokenizer = new_tiny_lm()
    cfg = GRPOConfig(steps=30, prompts_per_step=4, group_size=8, max_new_tokens=4, lr=3e-2, temperature=1.0)

    def sevens(completions, targets):
        return [c.count("7") / 4 for c in completions]

    trainer = GRPOTrainer(LMPolicy(model, tokenizer), sevens, cfg, torch.Generator().manual_seed(0))
    log = StepLog()
    trainer.train(lambda: (["1+2=", "3+4=", "5-1=", "9+9="], [0, 0, 0, 0]), Loop(log=log, desc="test"))
    first = sum(r["reward_mean"] for r in log.rows[:5]) / 5
    last = sum(r["reward_mean"] for r in log.rows[-5:]) / 5
    assert last > first + 0.3, (first, last)
    for key in ("reward_std", "zero_std_groups", "kl", "clip_fraction", "loss", "tokens_per_s"):
        assert key in log.rows[-1]


def test_sampler_logprobs_are_pi_old_and_groups_share_their_prompt(tiny_lm):
    """With iterations > 1 the trainer takes pi_old from the sampler: the teacher-forced (shared-prefix)
    pass of the same policy in eval mode gives the same numbers; a group's rows repeat their prompt."""
    model, tokenizer = tiny_lm
    policy = LMPolicy(model, tokenizer)
    prompts, G = ["1+2=", "30-4=", "7+7="], 4
    rollout = policy.rollout(
        prompts,
        GRPOConfig(steps=1, prompts_per_step=3, max_new_tokens=5, lr=1.0).sampling,
        torch.Generator().manual_seed(0),
        group_size=G,
    )
    assert rollout.group_size == G and rollout.completions.ids.shape[0] == len(rollout.texts) == 12
    assert torch.equal(
        rollout.prompt_ids, tokenize_prompts(tokenizer, [p for p in prompts for _ in range(G)], "cpu")[0]
    )
    with torch.no_grad():
        teacher_forced = policy.logprobs(rollout, 1.0)
    assert torch.allclose(rollout.completions.logprobs, teacher_forced, atol=1e-5)


def _varied(completions, targets):  # a reward that differs within groups: every advantage is non-zero
    return [float(sum(map(ord, c)) % 7) for c in completions]


def test_exploration_noise_is_importance_corrected_pi_over_q(tiny_lm):
    """Tokens drawn with exploration noise come from q, not pi: pi_old in the ratio is q (the sampler's
    behaviour log-probs), so at step 0 the ratio is pi / q, not 1, and the clip acts on it."""
    model, tokenizer = tiny_lm
    policy, prompts = LMPolicy(model, tokenizer), ["1+2=", "30-4="]
    noisy = GRPOConfig(steps=1, prompts_per_step=2, group_size=4, max_new_tokens=4, lr=1e-3, exploration_noise=2.0)
    trainer = GRPOTrainer(policy, _varied, noisy, torch.Generator().manual_seed(0))
    part = trainer.sample(prompts, [0, 0], trainer.generators[0])
    completions = part.rollout.completions
    assert part.old_logprobs is completions.behaviour_logprobs
    with torch.no_grad():
        ratio = (policy.logprobs(part.rollout, 1.0) - part.old_logprobs).exp()[completions.mask]
    expected = (completions.logprobs - completions.behaviour_logprobs).exp()[completions.mask]
    torch.testing.assert_close(ratio, expected, atol=1e-4, rtol=1e-4)
    assert (ratio - 1).abs().max() > 0.5
    plain = GRPOConfig(steps=1, prompts_per_step=2, group_size=4, max_new_tokens=4, lr=1e-3)
    plain_trainer = GRPOTrainer(policy, _varied, plain, torch.Generator().manual_seed(0))
    assert plain_trainer.sample(prompts, [0, 0], plain_trainer.generators[0]).old_logprobs is None  # ratio = 1
    row = GRPOTrainer(copy.deepcopy(policy), _varied, noisy, torch.Generator().manual_seed(0)).step(0, prompts, [0, 0])
    assert row["clip_fraction"] > 0  # on-policy, one iteration: exactly 0


def test_a_diverged_update_is_named_with_its_step():
    """A huge learning rate: the update of step 0 makes the weights non-finite; step 1 fails at sampling with an
    error that names the step and the cause, not torch.multinomial's."""
    from tests.tiny import new_tiny_lm

    model, tokenizer = new_tiny_lm()
    cfg = GRPOConfig(steps=2, prompts_per_step=2, group_size=4, max_new_tokens=3, lr=1e10)
    trainer = GRPOTrainer(LMPolicy(model, tokenizer), _varied, cfg, torch.Generator().manual_seed(0))
    trainer.step(0, ["1+2=", "30-4="], [0, 0])
    with pytest.raises(NonFiniteLogitsError, match="step 1.*logits are not finite.*weights have diverged"):
        trainer.step(1, ["1+2=", "30-4="], [0, 0])


def _scoring_passes(trainer, monkeypatch) -> list[bool]:
    """Record, per call of the policy's teacher-forced scoring, whether gradients were on."""
    calls, score = [], trainer.policy.logprobs

    def counted(rollout, temperature):
        calls.append(torch.is_grad_enabled())
        return score(rollout, temperature)

    monkeypatch.setattr(trainer.policy, "logprobs", counted)
    return calls


def test_pi_old_is_recomputed_only_with_several_iterations_and_its_first_ratio_is_one(tiny_lm, monkeypatch):
    """iterations 1 (the DAG's): no extra pass (the detached loss log-probs are pi_old). iterations 2: one
    no-grad teacher-forced pass recomputes pi_old before the first update, so in float32 the first ratio is
    exactly 1 (the sampler's KV-cached log-probs differ from it in rounding)."""
    import latentlab.rl.grpo as grpo

    model, tokenizer = tiny_lm
    prompts = ["1+2=", "30-4="]
    seen = []

    def recording(logprobs, old, *args, **kwargs):
        seen.append((logprobs.detach().clone(), old.clone()))
        return grpo_loss(logprobs, old, *args, **kwargs)

    monkeypatch.setattr(grpo, "grpo_loss", recording)
    for iterations, expected in ((1, [True]), (2, [False, True, True])):
        cfg = GRPOConfig(steps=1, prompts_per_step=2, group_size=4, max_new_tokens=5, lr=1e-2, iterations=iterations)
        trainer = GRPOTrainer(LMPolicy(copy.deepcopy(model), tokenizer), _varied, cfg, torch.Generator().manual_seed(0))
        calls = _scoring_passes(trainer, monkeypatch)
        seen.clear()
        trainer.step(0, prompts, [0, 0])
        assert calls == expected
    (first, old), (second, _) = seen
    assert torch.equal(first, old)  # ratio exactly 1 at the first iteration
    assert not torch.equal(second, old)  # the update moved pi_theta away from pi_old


def test_top_p_samples_are_importance_corrected_by_the_renormalised_nucleus(tiny_lm):
    """top_p < 1 draws from q = pi renormalised on the nucleus: the sampler returns log q (log pi minus the
    log of the nucleus mass) and GRPO uses it as the old policy, as for exploration noise."""
    from latentlab.lm.logprobs import tempered_logprobs
    from latentlab.lm.sampling import _nucleus, teacher_forced_logits

    model, tokenizer = tiny_lm
    policy = LMPolicy(model, tokenizer)
    cfg = GRPOConfig(steps=1, prompts_per_step=2, group_size=4, max_new_tokens=5, lr=1e-3, top_p=0.7)
    trainer = GRPOTrainer(policy, _varied, cfg, torch.Generator().manual_seed(0))
    part = trainer.sample(["1+2=", "30-4="], [0, 0], trainer.generators[0])
    completions = part.rollout.completions
    assert part.old_logprobs is completions.behaviour_logprobs is not None
    with torch.no_grad():
        rollout = part.rollout
        logits = teacher_forced_logits(model, *policy.prefix(rollout), completions)
        nucleus = torch.log_softmax(_nucleus(tempered_logprobs(logits, 1.0), 0.7), -1)
        expected = nucleus.gather(-1, completions.ids[..., None]).squeeze(-1)[completions.mask]
    torch.testing.assert_close(completions.behaviour_logprobs[completions.mask], expected, atol=1e-4, rtol=1e-4)
    gap = (completions.behaviour_logprobs - completions.logprobs)[completions.mask]
    assert (gap >= -1e-6).all() and gap.max() > 0.05  # q >= pi on the nucleus, > where it cut mass
