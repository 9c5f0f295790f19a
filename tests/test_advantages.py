"""Advantage estimators against hand-computed values."""

import pytest
import torch

from latentlab.rl.advantages import gae


def test_gae_matches_the_recursion_by_hand():
    # T = 3, one environment, no episode end; gamma 0.5, lambda 0.5
    rewards = torch.tensor([1.0, 0.0, 2.0])
    values = torch.tensor([0.5, 1.0, 0.0])
    # delta_0 = 1 + .5*1 - .5 = 1.0 ; delta_1 = 0 + .5*0 - 1 = -1.0 ; delta_2 = 2 + .5*4 - 0 = 4.0 (last_value 4)
    # A_2 = 4 ; A_1 = -1 + .25*4 = 0 ; A_0 = 1 + .25*0 = 1
    advantages = gae(rewards, values, torch.zeros(3), torch.tensor(4.0), gamma=0.5, lam=0.5)
    assert advantages.tolist() == pytest.approx([1.0, 0.0, 4.0])


def test_gae_does_not_bootstrap_across_an_episode_end():
    rewards = torch.tensor([1.0, 0.0, 2.0])
    values = torch.tensor([0.5, 1.0, 0.0])
    dones = torch.tensor([0.0, 1.0, 0.0])  # the episode ends with step 1; step 2 starts a new one
    # delta_1 = 0 - 1 = -1 (no V(s_2)); A_1 = -1 (no A_2); A_0 = 1 + .25*(-1) = 0.75
    advantages = gae(rewards, values, dones, torch.tensor(4.0), gamma=0.5, lam=0.5)
    assert advantages.tolist() == pytest.approx([0.75, -1.0, 4.0])


def test_gae_limits_are_td_error_and_monte_carlo():
    rewards, values = torch.tensor([1.0, 2.0]), torch.tensor([3.0, 5.0])
    last, gamma = torch.tensor(7.0), 0.9
    td = gae(rewards, values, torch.zeros(2), last, gamma, lam=0.0)
    assert td.tolist() == pytest.approx([1 + 0.9 * 5 - 3, 2 + 0.9 * 7 - 5])
    mc = gae(rewards, values, torch.zeros(2), last, gamma, lam=1.0)
    assert (mc + values).tolist() == pytest.approx([1 + 0.9 * 2 + 0.81 * 7, 2 + 0.9 * 7])


def test_gae_runs_batched_over_environments_and_checks_shapes():
    rewards = torch.tensor([[1.0, 0.0], [0.0, 1.0]])  # (T=2, envs=2)
    values = torch.zeros(2, 2)
    out = gae(rewards, values, torch.zeros(2, 2), torch.zeros(2), gamma=1.0, lam=1.0)
    assert out.flatten().tolist() == pytest.approx([1.0, 1.0, 0.0, 1.0])
    with pytest.raises(ValueError, match="same shape"):
        gae(rewards, values[:1], torch.zeros(2, 2), torch.zeros(2), gamma=1.0, lam=1.0)
