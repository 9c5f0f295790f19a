"""AWR's math against hand-computed values, and a training run that moves the policy the right way."""

import math

import pytest
import torch

from latentlab.common.tracking import StepLog
from latentlab.rl.awr import AWRConfig, Batch, awr_weights, td_lambda_returns, train_awr

# two episodes: (t0, t1, t2 done) and (t3, t4 done)
REWARDS = torch.tensor([0.0, 0.0, 1.0, 0.0, 1.0])
VALUES = torch.tensor([0.5, 0.6, 0.7, 0.2, 0.4])
DONES = torch.tensor([False, False, True, False, True])


def test_td_lambda_returns_by_hand():
    """gamma 0.9, lambda 0.5. By the recursive definition R_t = r_t + gamma ((1 - lam) V(s_t+1) + lam R_t+1),
    with R = r at an episode's last step:
        R2 = 1;  R1 = 0.9 (0.5 * 0.7 + 0.5 * 1) = 0.765;  R0 = 0.9 (0.5 * 0.6 + 0.5 * 0.765) = 0.61425
        R4 = 1;  R3 = 0.9 (0.5 * 0.4 + 0.5 * 1) = 0.63
    and A = R - V."""
    advantages, returns = td_lambda_returns(REWARDS, VALUES, DONES, gamma=0.9, lam=0.5)
    expected = torch.tensor([0.61425, 0.765, 1.0, 0.63, 1.0])
    torch.testing.assert_close(returns, expected)
    torch.testing.assert_close(advantages, expected - VALUES)


def test_lambda_one_is_the_discounted_monte_carlo_return():
    _, returns = td_lambda_returns(REWARDS, VALUES, DONES, gamma=0.9, lam=1.0)
    torch.testing.assert_close(returns, torch.tensor([0.81, 0.9, 1.0, 0.9, 1.0]))


def test_the_data_must_end_with_a_finished_episode():
    with pytest.raises(ValueError, match="done"):
        td_lambda_returns(REWARDS, VALUES, torch.tensor([False, False, True, False, False]), 0.9, 0.5)


def test_weights_by_hand():
    """A = 1..4: mean 2.5, sample std sqrt(5/3); beta 0.5: exp(2 A_hat) = 0.0979, 0.4609, 2.1697, 10.21 -> clipped at 5."""
    weights = awr_weights(torch.tensor([1.0, 2.0, 3.0, 4.0]), beta=0.5, w_max=5.0)
    torch.testing.assert_close(weights, torch.tensor([0.0979018, 0.4608896, 2.1697168, 5.0]))


def test_weights_ignore_a_shift_of_the_advantages():
    a = torch.tensor([0.3, -1.0, 2.0, 0.5])
    torch.testing.assert_close(awr_weights(a, 1.0, 20.0), awr_weights(a + 7.0, 1.0, 20.0))


class Bandit(torch.nn.Module):
    """A two-action policy with no state: logits and a value are free parameters."""

    def __init__(self):
        super().__init__()
        self.logits = torch.nn.Parameter(torch.zeros(2))
        self.v = torch.nn.Parameter(torch.zeros(()))

    def forward(self, image, hidden=None):
        n = image.shape[0]
        return self.logits.expand(n, 2), self.v.expand(n)


def test_training_reaches_the_weighted_regression_optimum():
    """One-step episodes, actions half 0 half 1, reward only for action 1. Behaviour cloning would stay
    at 50/50. With V = 0.5 the advantages are +-0.5, normalised +-1, so the weights are e and 1/e, and
    the optimum of sum_a mu(a) w(a) log pi(a) is pi(1) = e / (e + 1/e) = e^2 / (1 + e^2) = 0.8808."""
    n = 512
    action = torch.arange(n) % 2
    data = Batch(torch.zeros(n, 4, 4, 3, dtype=torch.uint8), None, action, action.float(), torch.ones(n, dtype=bool))
    model = Bandit()
    cfg = AWRConfig(iterations=4, steps_per_iteration=50, batch_size=64, lr=0.05)
    train_awr(model, data, cfg, torch.Generator().manual_seed(0), StepLog())
    assert abs(model.logits.softmax(0)[1].item() - math.exp(2) / (1 + math.exp(2))) < 0.02
    assert abs(model.v.item() - 0.5) < 0.05
