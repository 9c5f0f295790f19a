"""SAC: Polyak targets by hand, the tanh log-prob correction against a numeric Jacobian, the direction of
entropy tuning, the bandit target, and random actions before learning_starts."""

import math

import torch

from latentlab.rl.sac import SAC, Actor, SACConfig, log_one_minus_tanh_squared, polyak_update


def test_polyak_update_by_hand():
    source, target = torch.nn.Linear(1, 1), torch.nn.Linear(1, 1)
    with torch.no_grad():
        source.weight.fill_(2.0), source.bias.fill_(-1.0)
        target.weight.fill_(0.0), target.bias.fill_(3.0)
    polyak_update(source, target, tau=0.1)
    assert target.weight.item() == torch.tensor(0.9 * 0.0 + 0.1 * 2.0).item()  # 0.2
    assert math.isclose(target.bias.item(), 0.9 * 3.0 + 0.1 * -1.0, rel_tol=1e-6)  # 2.6


def test_log_one_minus_tanh_squared_is_stable():
    u = torch.tensor([-30.0, -2.0, 0.0, 0.5, 30.0], dtype=torch.float64)
    expected = torch.log(1 - torch.tanh(u[1:4]) ** 2)
    torch.testing.assert_close(log_one_minus_tanh_squared(u)[1:4], expected)
    assert torch.isfinite(log_one_minus_tanh_squared(u)).all()  # the naive form is log(0) = -inf at |u| = 30
    torch.testing.assert_close(log_one_minus_tanh_squared(u)[[0, 4]], torch.full((2,), 2 * math.log(2) - 60.0).double())


def test_squash_correction_matches_a_numeric_density():
    """log pi(a) of a = tanh(u), u ~ N(mu, sigma): change of variables p_a(a) = p_u(atanh a) |d atanh(a) / da|,
    the derivative taken by central finite differences, independently of the closed form."""
    torch.manual_seed(0)
    actor = Actor(obs_dim=3, action_dim=2, hidden=8)
    obs = torch.randn(5, 3)
    action, log_prob, _ = actor.sample(obs, torch.Generator().manual_seed(1))
    mean, log_std = actor.distribution(obs)
    a = action.double()
    u = torch.atanh(a)
    gaussian = torch.distributions.Normal(mean.double(), log_std.exp().double()).log_prob(u)
    h = 1e-6
    jacobian = (torch.atanh(a + h) - torch.atanh(a - h)) / (2 * h)
    numeric = (gaussian + torch.log(jacobian)).sum(-1)
    torch.testing.assert_close(log_prob.double(), numeric, rtol=1e-4, atol=1e-3)


def test_entropy_tuning_direction():
    """alpha rises when the policy is more certain than the target entropy (log pi > -H), falls otherwise."""
    for log_pi, direction in ((5.0, +1), (-5.0, -1)):
        agent = SAC(2, 2, SACConfig(initial_alpha=0.5), torch.Generator().manual_seed(0))
        assert agent.target_entropy == -2.0
        before = agent.alpha
        loss = agent.alpha_loss(torch.full((8,), log_pi))
        agent.alpha_optimizer.zero_grad()
        loss.backward()
        agent.alpha_optimizer.step()
        assert (agent.alpha - before) * direction > 0


def test_bandit_critic_learns_the_reward_and_bootstrapping_inflates_it():
    """gamma = 0: Q(s, a) -> r. One-step transitions bootstrapped with gamma = 0.99 and no done flag (the
    reference's setting) push Q far above every reward it ever saw."""
    q_means = {}
    for gamma in (0.0, 0.99):
        torch.manual_seed(0)
        cfg = SACConfig(gamma=gamma, learning_starts=8, batch_size=32, q_lr=3e-3, tau=0.05, hidden=32)
        agent = SAC(2, 1, cfg, torch.Generator().manual_seed(0))
        obs = torch.zeros(2)
        for _ in range(400):
            action = agent.act(obs)
            stats = agent.observe(obs, action, 1.0, obs, done=False)
        q_means[gamma] = stats["q_mean"]
    assert abs(q_means[0.0] - 1.0) < 0.1
    assert q_means[0.99] > 3.0


def test_random_actions_until_learning_starts():
    agent = SAC(2, 3, SACConfig(learning_starts=4), torch.Generator().manual_seed(0))
    with torch.no_grad():  # an actor whose mode is far from any uniform draw
        agent.actor.trunk[-1].weight.zero_()
        agent.actor.trunk[-1].bias.zero_()
    first = agent.act(torch.zeros(2))
    assert first.shape == (3,) and (first.abs() <= 1).all() and not torch.allclose(first, torch.zeros(3), atol=0.05)
    assert torch.equal(agent.act(torch.zeros(2), deterministic=True), torch.zeros(3))  # the mode, tanh(0)
    stats = [agent.observe(torch.zeros(2), torch.zeros(3), 0.0, torch.zeros(2)) for _ in range(4)]
    assert stats[:3] == [{}, {}, {}] and "q1_loss" in stats[3]  # no update before learning_starts


def test_state_dict_round_trip():
    agent = SAC(2, 3, SACConfig(), torch.Generator().manual_seed(0))
    other = SAC(2, 3, SACConfig(initial_alpha=0.9), torch.Generator().manual_seed(1))
    other.load_state_dict(agent.state_dict())
    assert other.alpha == agent.alpha
    for k, v in agent.state_dict().items():
        assert torch.equal(v, other.state_dict()[k]), k
