"""PPO (rl/ppo.py): the clipped policy and value losses and GAE over token rewards against hand-computed
values, the value head, and a short real run on a plain LM policy whose reward rises."""

import math

import pytest
import torch

from latentlab.common.errors import NonFiniteLogitsError
from latentlab.common.execution import plain_means
from latentlab.common.tracking import StepLog
from latentlab.lm.sampling import SamplingConfig
from latentlab.policies.lm_policy import LMPolicy
from latentlab.policies.value_head import ValueHead, logprobs_and_values
from latentlab.rl.advantages import gae
from latentlab.rl.ppo import PPOConfig, PPOTrainer, approx_kl, ppo_policy_loss, ppo_value_loss, sequence_rewards
from tests.tiny import new_tiny_lm


def test_the_clipped_policy_loss_by_hand():
    # ratios 1.5, 0.5, 0.5, 1.5 with advantages +1, +1, -1, -1; e = 0.2; the fifth token is masked
    old = torch.zeros(1, 5)
    new = torch.tensor([[math.log(1.5), math.log(0.5), math.log(0.5), math.log(1.5), 9.0]])
    adv = torch.tensor([[1.0, 1.0, -1.0, -1.0, 100.0]])
    mask = torch.tensor([[1, 1, 1, 1, 0]])
    loss, stats = plain_means(ppo_policy_loss(new, old, adv, mask, 0.2), {"tokens": mask.sum()})
    # min(1.5, 1.2) = 1.2; min(0.5, 0.8) = 0.5; min(-0.5, -0.8) = -0.8; min(-1.5, -1.2) = -1.5
    assert loss.item() == pytest.approx(-(1.2 + 0.5 - 0.8 - 1.5) / 4)
    assert stats["clip_fraction"] == pytest.approx(1.0)
    # k3 of KL(pi_old || pi) under samples from pi_old: (r - 1) - log r with r = pi / pi_old = the ratio
    k3 = [0.5 - math.log(1.5), -0.5 + math.log(2), -0.5 + math.log(2), 0.5 - math.log(1.5)]
    assert stats["kl"] == pytest.approx(sum(k3) / 4, rel=1e-5)


def test_the_logged_kl_estimates_kl_of_pi_old_to_pi_under_samples_from_pi_old():
    """Tokens are drawn from pi_old: the logged kl is an unbiased estimate of KL(pi_old || pi) = sum pi_old log(pi_old/pi).
    (k3 of the other direction, exp(-log r) + log r - 1, averages to chi2(pi_old || pi) - KL here: 0.75, not 0.456.)"""
    pi_old, pi = torch.tensor([0.4, 0.3, 0.2, 0.1]), torch.tensor([0.1, 0.2, 0.3, 0.4])
    exact = (pi_old * (pi_old / pi).log()).sum().item()
    actions = torch.multinomial(pi_old, 200_000, replacement=True, generator=torch.Generator().manual_seed(0))
    old_logprobs, logprobs = pi_old.log()[actions][None], pi.log()[actions][None]
    everywhere = torch.ones(1, len(actions))
    loss = ppo_policy_loss(logprobs, old_logprobs, torch.zeros(1, len(actions)), everywhere, 0.2)
    _, stats = plain_means(loss, {"tokens": everywhere.sum()})
    # per-sample k3 values lie in [0.07, 1.62]: the standard error of the mean of 200 000 is below 0.002
    assert stats["kl"] == pytest.approx(exact, abs=0.01)
    assert approx_kl(logprobs - old_logprobs).mean().item() == pytest.approx(stats["kl"], rel=1e-6)


def test_the_clipped_value_loss_by_hand():
    values, old, returns = torch.tensor([[2.0, 0.2, 5.0]]), torch.tensor([[1.0, 1.0, 0.0]]), torch.zeros(1, 3)
    mask = torch.tensor([[1, 1, 0]])
    # row 1: max((2-0)^2, (1.5-0)^2) = 4; row 2: max(0.2^2, (0.5-0)^2) = 0.25; 1/2 mean = (4 + 0.25) / 4
    term = ppo_value_loss(values, old, returns, mask, 0.5)
    assert term.over == "tokens" and term.sum.item() / mask.sum().item() == pytest.approx((4 + 0.25) / 4)


def test_gae_over_a_completion_rewarded_at_its_last_token():
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    rewards, dones = sequence_rewards(torch.tensor([1.0, 2.0]), mask)
    assert rewards.tolist() == [[0, 0, 1], [2, 0, 0]] and dones.tolist() == [[0, 0, 1], [1, 0, 0]]
    values = torch.tensor([[0.5, 0.2, 0.1], [0.3, 0.0, 0.0]])
    adv = gae(rewards.T, values.T, dones.T, torch.zeros(2), gamma=1.0, lam=0.5).T * mask
    # row 0: deltas -0.3, -0.1, 0.9; A2 = 0.9, A1 = -0.1 + 0.5 * 0.9, A0 = -0.3 + 0.5 * 0.35
    # row 1: done at t = 0, nothing bootstrapped from the padding: A0 = 2 - 0.3
    torch.testing.assert_close(adv, torch.tensor([[-0.125, 0.35, 0.9], [1.7, 0.0, 0.0]]))


def test_the_value_head_starts_at_zero_and_reads_the_positions_that_predict_each_token():
    model, tokenizer = new_tiny_lm()
    policy, head = LMPolicy(model, tokenizer), ValueHead(model.config.hidden_size)
    rollout = policy.rollout(["1+2=", "30-4="], SamplingConfig(max_new_tokens=5), torch.Generator().manual_seed(0))
    with torch.no_grad():
        logprobs, values = logprobs_and_values(policy, head, rollout, 1.0)
        assert values.abs().max() == 0
        torch.nn.init.normal_(head.linear.weight)
        _, values = logprobs_and_values(policy, head, rollout, 1.0)
        # the reference: a plain forward pass over [prompt, completion]; the state that predicts completion
        # token t is the final norm's output at position P - 1 + t (the logits there score token t)
        ids, mask = rollout.prompt_ids, rollout.completions.mask
        P, T = ids.shape[1], mask.shape[1]
        full_mask = torch.cat([rollout.prompt_mask, mask.long()], 1)
        hidden = policy.model(
            input_ids=torch.cat([ids, rollout.completions.ids], 1),
            attention_mask=full_mask,
            position_ids=(full_mask.cumsum(-1) - 1).clamp(min=0),
            output_hidden_states=True,
        ).hidden_states[-1]
        expected = head(hidden[:, P - 1 : P + T - 1]) * mask
    torch.testing.assert_close(logprobs, rollout.completions.logprobs, atol=1e-5, rtol=1e-5)
    assert T > 1 and (values[~mask] == 0).all() and (values[mask] != 0).all()
    torch.testing.assert_close(values, expected, rtol=0, atol=0)


def test_a_diverged_update_is_named_with_its_step():
    model, tokenizer = new_tiny_lm()
    policy, head = LMPolicy(model, tokenizer), ValueHead(model.config.hidden_size)
    cfg = PPOConfig(steps=2, rollouts_per_step=2, max_new_tokens=3, lr=1e10, epochs=1, minibatches=1)
    trainer = PPOTrainer(policy, head, lambda texts, _: [float(len(t)) for t in texts], cfg, torch.Generator())
    trainer.step(0, ["1+2=", "30-4="], [None, None])
    with pytest.raises(NonFiniteLogitsError, match="step 1.*logits are not finite"):
        trainer.step(1, ["1+2=", "30-4="], [None, None])


@pytest.mark.slow  # a real training run: ~30 s on a shared 2-core machine
def test_a_short_ppo_run_raises_the_reward():
    """A real LM policy learns to write the digit 7 (reward: its share of the characters)."""
    model, tokenizer = new_tiny_lm(embedding_scale=4.0)
    model.train()
    policy, head = LMPolicy(model, tokenizer), ValueHead(model.config.hidden_size)
    cfg = PPOConfig(steps=10, rollouts_per_step=16, max_new_tokens=4, lr=3e-3, epochs=2, minibatches=2)

    def reward(texts, targets):
        return [t.count("7") / max(1, len(t)) for t in texts]

    trainer = PPOTrainer(policy, head, reward, cfg, torch.Generator().manual_seed(0))
    log = StepLog()
    for step in range(cfg.steps):
        log.log(step, **trainer.step(step, ["1+2="] * 16, [None] * 16))
    rewards = [row["reward_mean"] for row in log.rows]
    assert {"kl", "clip_fraction", "value_loss", "policy_loss", "tokens_per_s"} <= set(log.rows[0])
    assert sum(rewards[-3:]) / 3 > sum(rewards[:3]) / 3 + 0.1
