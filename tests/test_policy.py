"""The actor-critic (shapes, the use_hidden switch, save/load), a short AWR training that beats random
on a fixed seed, and online evaluation with live extraction, in process and through a real server."""

import numpy as np
import pytest
import torch

from latentlab.common.errors import InputError
from latentlab.common.tracking import StepLog
from latentlab.hidden.extract import ExtractConfig, Extractor
from latentlab.policies.actor_critic import ActorCritic, ActorCriticConfig, load_policy, save_policy
from latentlab.rl.awr import AWRConfig, Batch, train_awr
from latentlab.tasks.grid import BehaviourConfig, GridConfig, collect
from latentlab.tasks.grid_online import (
    BehaviourAgent,
    OnlineConfig,
    PolicyAgent,
    RandomAgent,
    TextEncoder,
    paired,
    rollout,
)
from tests.label_fixtures import save_model
from tests.test_serve import start_server

GRID = GridConfig()
H = 32  # tests/tiny.py's hidden size


def policy(use_hidden: bool, seed: int = 0) -> ActorCritic:
    torch.manual_seed(seed)
    return ActorCritic(ActorCriticConfig(hidden_size=H, use_hidden=use_hidden, channels=8, features=32)).eval()


def test_shapes_and_the_use_hidden_switch():
    image = torch.randint(0, 256, (5, 28, 28, 3), dtype=torch.uint8)
    hidden = torch.randn(5, H)
    with_hidden, without = policy(True), policy(False)
    logits, value = with_hidden(image, hidden)
    assert logits.shape == (5, 3) and value.shape == (5,)
    assert not torch.allclose(with_hidden(image, hidden + 1.0)[0], logits)  # the state is an input
    with pytest.raises(ValueError, match="hidden"):
        with_hidden(image)
    logits, value = without(image)
    assert logits.shape == (5, 3) and value.shape == (5,)
    assert not hasattr(without, "hidden_mean")  # nothing of it touches a hidden state
    with_hidden.fit_hidden_scale(hidden)
    standardised = (hidden - hidden.mean(0)) / hidden.std(0)
    assert torch.allclose(
        with_hidden.actor(torch.cat([with_hidden.cnn(image.permute(0, 3, 1, 2) / 255), standardised], 1)),
        with_hidden(image, hidden)[0],
        atol=1e-5,
    )
    # same CNN for both (same seed): only the heads' input width differs
    assert torch.equal(with_hidden.cnn[0].weight, without.cnn[0].weight)
    assert with_hidden.actor[0].in_features == without.actor[0].in_features + H


def test_save_and_load_round_trip(tmp_path):
    model = policy(True)
    model.fit_hidden_scale(torch.randn(10, H) * 3 + 1)
    save_policy(model, tmp_path / "p", layer=-1)
    back = load_policy(tmp_path / "p")
    image, hidden = torch.randint(0, 256, (2, 28, 28, 3), dtype=torch.uint8), torch.randn(2, H)
    assert back.cfg == model.cfg
    torch.testing.assert_close(back(image, hidden)[0], model(image, hidden)[0])


def test_a_damaged_policy_is_refused_by_its_content_hash(tmp_path):
    save_policy(policy(True), tmp_path / "p", layer=-1)
    (weights,) = (tmp_path / "p").glob("*.safetensors")
    data = bytearray(weights.read_bytes())
    data[-5] ^= 0x01  # one bit of a weight
    weights.write_bytes(bytes(data))
    with pytest.raises(InputError, match="does not match the content hash"):
        load_policy(tmp_path / "p")


@pytest.fixture(scope="module")
def data():
    return collect(GRID, BehaviourConfig(transitions=1024, envs=8, random_share=0.5), seed=0)


EVAL = OnlineConfig(envs=8, episodes=32, greedy=False)


def test_short_awr_training_beats_random(data):
    """Observation only (no LM), 150 steps on 1,024 behaviour transitions, then 32 episodes online (actions
    sampled) on levels the data never saw: a higher mean return than uniform random on the same levels."""
    model = policy(False)
    image, action, reward, done = (torch.from_numpy(getattr(data, k)) for k in ("obs", "action", "reward", "done"))
    batch = Batch(image, None, action, reward, done)
    cfg = AWRConfig(iterations=3, steps_per_iteration=50, batch_size=128)
    train_awr(model, batch, cfg, torch.Generator().manual_seed(0), StepLog())
    trained = rollout(GRID, lambda envs: PolicyAgent(model, 8, None, EVAL, 0), EVAL, seed=100)
    random = rollout(GRID, lambda envs: RandomAgent(3, 0), EVAL, seed=100)
    assert len(trained.returns) == len(random.returns) == 32
    assert trained.returns.mean() > random.returns.mean() + 0.1, (trained.summary(), random.summary())
    assert paired(trained, random)["return_diff"] == pytest.approx(trained.returns.mean() - random.returns.mean())


def test_the_behaviour_agent_and_the_summary():
    episodes = rollout(GRID, lambda envs: BehaviourAgent(envs, 3, 0.0, 0), OnlineConfig(envs=4, episodes=8), seed=5)
    summary = episodes.summary()
    assert summary["episodes"] == 8 and summary["success_rate"] == 1.0  # the bot alone always succeeds
    low, high = summary["success_ci95"]
    assert low < 1.0 <= high + 1e-9 and summary["return_ci95"][0] <= summary["return_mean"]


@pytest.mark.parametrize("skip_n", [1, 3])
def test_live_extraction_every_skip_n_steps(tiny_lm, skip_n):
    model, tokenizer = tiny_lm
    encoder = TextEncoder(Extractor(model, tokenizer, ExtractConfig(layers=[-1], tokens=1)), -1, None)
    cfg = OnlineConfig(envs=4, episodes=4, skip_n=skip_n)
    agents = []

    def make(envs):
        agents.append(PolicyAgent(policy(True), 4, encoder, cfg, 0))
        return agents[0]

    episodes = rollout(GRID, make, cfg, seed=3)
    if skip_n == 1:
        assert agents[0].extracted == episodes.env_steps  # every env, every step
    else:
        assert episodes.env_steps / skip_n <= agents[0].extracted < episodes.env_steps


def test_online_through_a_real_server_matches_in_process(tiny_lm, tmp_path):
    """`latentlab serve` on 127.0.0.1 as the extractor: the same pooled states as in process (prompt
    mode is deterministic), so a greedy policy plays exactly the same episodes."""
    from latentlab.hidden.client import HiddenClient

    process, url = start_server(save_model(tiny_lm, tmp_path / "lm"), "--layers", "1", "-1", "--max-batch", "4")
    try:
        client = HiddenClient(url, -1)
        local = TextEncoder(Extractor(*tiny_lm, ExtractConfig(layers=[-1], tokens=1)), -1, None)
        texts = ["go to the red ball: red ball 2r1", "go to a grey key:", "go to the blue box: blue box 0l1"] * 3
        np.testing.assert_allclose(client(texts), local(texts), atol=1e-5)  # 9 texts: 3 requests of max_batch 4
        cfg = OnlineConfig(envs=4, episodes=8)
        runs = [
            rollout(GRID, lambda envs, e=encoder: PolicyAgent(policy(True), 4, e, cfg, 0), cfg, seed=7)
            for encoder in (client, local)
        ]
        assert np.array_equal(runs[0].returns, runs[1].returns) and np.array_equal(runs[0].lengths, runs[1].lengths)
        with pytest.raises(ValueError, match="serves layers"):
            HiddenClient(url, 0)
        client.close()
    finally:
        process.terminate()
        process.wait(timeout=10)
