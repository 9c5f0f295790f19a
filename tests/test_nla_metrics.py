"""The NLA metrics by hand (issue 25): targets on one fixed scale, FVE as a fraction of variance explained
(a perfect critic 1, the mean predictor 0), cosine as its own metric, the reward of an empty explanation,
the identity start and the saved scale.

Most tests stub the critic's prediction (`critic.predict`: text -> t_hat) so that every number is known."""

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from latentlab.common.errors import InputError
from latentlab.common.execution import Loop
from latentlab.common.tracking import StepLog
from latentlab.policies.nla_critic import (
    WEIGHTS,
    NLACriticConfig,
    build_critic,
    fraction_of_variance_explained,
    load_critic,
    save_critic,
)
from latentlab.rl.nla import CriticReward, CriticTrainer, CriticUpdates, train_rl
from latentlab.tasks.nla_eval import reconstruction_scores
from tests.tiny import new_tiny_lm

MU = np.array([5.0, -3.0], np.float32)
# training vectors mu + (+-2, 0), mu + (0, +-2): mean mu, every centred row of norm 2, so sigma = 2
TRAIN = MU + np.array([[2, 0], [-2, 0], [0, 2], [0, -2]], np.float32)
# held-out targets t, their vectors v = mu + sigma t, and a critic's predictions t_hat, row for row:
T = np.array([[1, 0], [-1, 0], [0, 2], [0, -2]], np.float32)  # mean 0; sum ||t - mean||^2 = 1 + 1 + 4 + 4 = 10
T_HAT = np.array([[1, 0], [0, 0], [0, 1], [0, -2]], np.float32)  # squared errors 0, 1, 1, 0: sum 2
TEXTS = ["a", "b", "c", "d"]


def _critic(vectors=TRAIN, **cfg):
    model, tokenizer = new_tiny_lm()
    return build_critic(model, tokenizer, NLACriticConfig(layer=1, **cfg), vectors)


def _stub(critic, predictions: dict[str, np.ndarray]):
    """The critic predicts `predictions[text]` for each text (t_hat, on the targets' scale)."""
    critic.predict = lambda texts: torch.tensor(np.stack([predictions[t] for t in texts]))
    return critic


def test_targets_are_centred_and_divided_by_one_scalar_the_rms_norm_of_the_centred_training_vectors():
    critic = _critic()
    assert critic.scale.item() == pytest.approx(2.0)
    torch.testing.assert_close(critic.mean, torch.tensor(MU))
    torch.testing.assert_close(critic.target(MU + 2 * T), torch.tensor(T))
    assert critic.target(TRAIN).pow(2).sum(-1).mean().item() == pytest.approx(1.0)  # mean ||t||^2 = 1 on them


def test_a_perfect_critic_scores_fve_1_and_the_mean_predictor_0():
    vectors = MU + 2 * T[[0, 2, 3]]  # targets with a nonzero mean: the mean predictor is not t_hat = 0
    targets = T[[0, 2, 3]]
    texts = TEXTS[:3]
    perfect = reconstruction_scores(_stub(_critic(), dict(zip(texts, targets))), texts, vectors)
    assert perfect["fve"] == 1.0 and perfect["mse"] == 0.0
    assert perfect["cosine"] == pytest.approx(1.0)
    mean = reconstruction_scores(_stub(_critic(), dict.fromkeys(texts, targets.mean(0))), texts, vectors)
    assert mean["fve"] == pytest.approx(0.0, abs=1e-6)


def test_fve_cosine_and_mse_of_a_small_example_by_hand():
    critic = _stub(_critic(), dict(zip(TEXTS, T_HAT)))
    scores = reconstruction_scores(critic, TEXTS, MU + 2 * T)
    assert scores["fve"] == pytest.approx(1 - 2 / 10)
    assert scores["mse"] == pytest.approx(2 / 4)  # on t's scale (on v's: 4 times that)
    assert scores["cosine"] == pytest.approx((1 + 0 + 1 + 1) / 4)  # cos(0, t) = 0
    # the same FVE on the vectors' own scale, v_hat = mu + sigma t_hat
    v, v_hat = torch.tensor(MU + 2 * T), critic.vector(torch.tensor(T_HAT))
    assert 1 - (v - v_hat).pow(2).sum() / (v - v.mean(0)).pow(2).sum() == pytest.approx(scores["fve"])


def test_fve_sees_the_norm_of_the_prediction_and_cosine_does_not():
    """Twice the right direction: every cosine 1, but an error as large as the target itself (FVE 0)."""
    critic = _stub(_critic(), dict(zip(TEXTS, 2 * T)))
    scores = reconstruction_scores(critic, TEXTS, MU + 2 * T)
    assert scores["cosine"] == pytest.approx(1.0)
    assert scores["fve"] == pytest.approx(0.0)
    assert scores["mse"] == pytest.approx(10 / 4)


def test_fve_pools_squared_errors_over_rows_not_per_row_fractions():
    errors, targets = torch.tensor([0.0, 1.0, 1.0, 0.0]), torch.tensor(T)
    assert fraction_of_variance_explained(errors, targets) == pytest.approx(0.8)
    # rows scored equally often (GRPO's groups) against their distinct targets: the same number
    assert fraction_of_variance_explained(errors.repeat_interleave(3), targets) == pytest.approx(0.8)
    assert np.isnan(fraction_of_variance_explained(errors[:2], targets[:1].repeat(2, 1)))  # one vector: undefined


def test_an_empty_explanation_earns_the_mean_predictors_reward_on_its_row():
    critic = _stub(_critic(), {"a": T[1], "": np.array([9.0, 9.0], np.float32)})  # "" is not read: a KeyError
    reward = CriticReward(critic, "neg_mse")
    rewards = reward(["", "a", "  "], list(MU + 2 * T[:3]))
    assert rewards == pytest.approx([-1.0, -0.0, -4.0])  # -||t||^2 for the empty rows: FVE 0 row by row
    torch.testing.assert_close(reward.last_cosine, torch.tensor([0.0, 1.0, 0.0]))
    read = reconstruction_scores(critic, ["", ""], MU + 2 * T[:2], read_empty=True)  # the evaluation's control
    assert read["mse"] == pytest.approx(((9 - 1) ** 2 + 81 + (9 + 1) ** 2 + 81) / 2)


class _OneGroupTrainer:
    """A trainer whose step samples each prompt twice (a GRPO group of 2) and asks the reward for them; its
    learner is the critic's (one process: nothing sharded)."""

    def __init__(self, reward, learner):
        self.reward, self.learner = reward, learner

    def step(self, step, prompts, targets):
        texts = [t for t in TEXTS for _ in range(2)]
        self.reward(texts, [v for v in targets for _ in range(2)])
        return {}


def test_the_rl_log_reports_fve_cosine_and_mse_of_the_batch_by_hand():
    critic = _stub(_critic(), dict(zip(TEXTS, T_HAT)))
    reward = CriticReward(critic, "neg_mse")
    log = StepLog()
    critic_trainer = CriticTrainer(critic, CriticUpdates(lr=1e-3, updates_per_step=0), 1)
    batches = iter([list(MU + 2 * T)])
    train_rl(
        _OneGroupTrainer(reward, critic_trainer.learner),
        reward,
        critic_trainer,
        batches,
        steps=1,
        loop=Loop(log=log, desc="test"),
    )
    (row,) = log.rows
    assert row["fve"] == pytest.approx(0.8)
    assert row["mse"] == pytest.approx(0.5)
    assert row["cosine"] == pytest.approx(0.75)


def test_the_identity_start_maps_the_gold_pooled_state_to_its_target():
    model, tokenizer = new_tiny_lm()
    H = model.config.hidden_size
    vectors = (3 + 5 * np.random.default_rng(0).normal(size=(8, H))).astype(np.float32)  # sigma far from 1
    critic = build_critic(model, tokenizer, NLACriticConfig(layer=1, pooling="mean"), vectors)
    ids, mask = critic.encode(["12+7=19\n3+4="])
    with torch.no_grad():
        state = model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[1].mean(1)
        torch.testing.assert_close(critic(ids, mask), critic.target(state.numpy()))
        torch.testing.assert_close(critic.vector(critic(ids, mask)), state, atol=1e-4, rtol=1e-5)
    assert critic.scale.item() == pytest.approx(5 * np.sqrt(H), rel=0.2)  # sigma, far from 1


def test_the_saved_critic_keeps_its_scale_and_an_old_one_without_it_is_refused(tmp_path, monkeypatch):
    vectors = (2 + 7 * np.random.default_rng(1).normal(size=(6, 32))).astype(np.float32)
    critic = _critic(vectors)
    save_critic(critic, tmp_path / "critic")
    reloaded = load_critic(tmp_path / "critic")
    assert reloaded.scale.item() == critic.scale.item() != 1.0
    torch.testing.assert_close(reloaded.target(vectors), critic.target(vectors))
    with torch.no_grad():
        torch.testing.assert_close(reloaded.predict(TEXTS), critic.predict(TEXTS))

    weights = tmp_path / "critic" / WEIGHTS  # a critic saved before issue 25: no scale
    save_file({k: v for k, v in load_file(weights).items() if k != "scale"}, str(weights))
    monkeypatch.setenv("LATENTLAB_SKIP_VERIFY", "1")  # an old critic's manifest matches its own files
    with pytest.raises(InputError, match=r"critic.*dvc repro nla_sft"):
        load_critic(tmp_path / "critic")


def test_a_critic_of_vectors_that_do_not_vary_is_refused():
    with pytest.raises(ValueError, match="do not vary"):
        _critic(np.ones((3, 2), np.float32))


def test_a_claims_entry_swept_before_fve_was_redefined_is_stale():
    """results/claims.json rows named `fve` from before issue 25 hold ~2 cos - 1: the report must not show them."""
    from flows.claims import CLAIMS, stale_claims

    old = {"claims": {"nla": {"title": "t", "rows": []}, "surgery": {"title": "s", "rows": []}}}
    assert list(stale_claims(old)) == ["nla"]
    assert stale_claims({"claims": {"nla": {**CLAIMS["nla"], "rows": []}}}) == {}


def test_a_damaged_critic_is_refused_by_its_content_hash(tmp_path):
    critic = _critic((2 + 7 * np.random.default_rng(1).normal(size=(6, 32))).astype(np.float32))
    save_critic(critic, tmp_path / "critic")
    weights = tmp_path / "critic" / WEIGHTS
    data = bytearray(weights.read_bytes())
    data[-5] ^= 0x01  # one bit of a weight
    weights.write_bytes(bytes(data))
    with pytest.raises(InputError, match="does not match the content hash"):
        load_critic(tmp_path / "critic")
