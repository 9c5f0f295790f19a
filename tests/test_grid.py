"""The grid world: real MiniGrid envs, the text rendering checked against the env's own grid, the
behaviour data's shapes and bookkeeping, the transitions store and its NPZ export."""

import numpy as np
import pytest
from minigrid.core.constants import COLOR_TO_IDX, OBJECT_TO_IDX

from latentlab.tasks.grid import (
    BehaviourConfig,
    GridConfig,
    collect,
    describe,
    make_env,
    make_vector_env,
    read_transitions,
    write_transitions,
)

GRID = GridConfig()


@pytest.fixture(scope="module")
def data():
    return collect(GRID, BehaviourConfig(transitions=300, envs=4, random_share=0.5), seed=0)


def test_observations_are_rgb_images_and_short_texts():
    envs = make_vector_env(GRID, 3)
    obs, _ = envs.reset(seed=0)
    assert obs["image"].shape == (3, 28, 28, 3) and obs["image"].dtype == np.uint8
    assert len(obs["text"]) == 3 and all(t.startswith("go to ") and len(t) <= GRID.text_chars for t in obs["text"])
    obs, *_ = envs.step(np.array([0, 1, 2]))
    assert obs["image"].shape == (3, 28, 28, 3)
    envs.close()


def test_describe_by_hand():
    view = np.zeros((7, 7, 3), dtype=np.uint8)
    view[:, :, 0] = OBJECT_TO_IDX["empty"]
    view[4, 4] = OBJECT_TO_IDX["ball"], COLOR_TO_IDX["red"], 0  # 2 ahead (row 6 is the agent's), 1 right
    view[1, 6] = OBJECT_TO_IDX["key"], COLOR_TO_IDX["grey"], 0  # beside the agent, 2 left: nearer, so first
    assert describe("go to the red ball", view, 56) == "go to the red ball: grey key 0l2, red ball 2r1"
    assert describe("go to the red ball", view, 32) == "go to the red ball: grey key 0l2"  # the nearest that fit
    assert describe("go to the red ball", view, 31) == "go to the red ball:"
    with pytest.raises(ValueError, match="text_chars"):
        describe("go to the red ball", view, 10)


def test_the_text_names_what_is_really_there():
    """Every object the text places (ahead, side) is at agent + ahead * dir + side * right in the env's grid."""
    env = make_env(GRID)
    rng = np.random.default_rng(0)
    checked = 0
    for episode in range(5):
        obs, _ = env.reset(seed=episode)
        for _ in range(10):
            level = env.unwrapped
            for part in obs["text"].split(":", 1)[1].split(","):
                if not part.strip():
                    continue
                color, kind, where = part.split()
                ahead = int(where.split("r")[0].split("l")[0])
                side = (
                    int(where[where.index("r") + 1 :])
                    if "r" in where
                    else -int(where.split("l")[1])
                    if "l" in where
                    else 0
                )
                x, y = np.array(level.agent_pos) + ahead * level.dir_vec + side * level.right_vec
                cell = level.grid.get(int(x), int(y))
                assert (cell.color, cell.type) == (color, kind), obs["text"]
                checked += 1
            obs, _, terminated, truncated, _ = env.step(int(rng.integers(3)))
            if terminated or truncated:
                break
    assert checked > 20


def test_behaviour_data_is_whole_ordered_episodes(data):
    n = len(data)
    assert n >= 300 and data.obs.shape == data.next_obs.shape == (n, 28, 28, 3) and data.obs.dtype == np.uint8
    assert data.done[-1] and np.all(np.diff(data.episode) >= 0)
    starts = np.flatnonzero(data.step == 0)
    assert np.array_equal(starts[1:] - 1, np.flatnonzero(data.done)[:-1])  # an episode starts after each end
    inside = ~data.done[:-1]
    assert np.array_equal(data.next_obs[:-1][inside], data.obs[1:][inside])  # s' of one step is s of the next
    assert np.all(data.reward[~data.done] == 0) and np.all(data.reward[data.done] >= 0)
    # eps = 0.5, 3 actions: pi_b(a) = 0.5 + 0.5 / 3 for the bot's action, 0.5 / 3 for the others
    probs = np.exp(data.log_prob)
    assert np.all(np.isclose(probs, 0.5 + 0.5 / 3) | np.isclose(probs, 0.5 / 3))
    assert set(np.unique(data.action)) <= {0, 1, 2}
    assert len(data.text) == n and data.table().height == n


def test_the_bot_alone_always_succeeds():
    data = collect(GRID, BehaviourConfig(transitions=60, envs=2, random_share=0.0), seed=1)
    assert np.all(data.reward[data.done] > 0) and np.allclose(data.log_prob, 0.0)


def test_collection_is_seeded(data):
    again = collect(GRID, BehaviourConfig(transitions=300, envs=4, random_share=0.5), seed=0)
    assert np.array_equal(again.obs, data.obs) and np.array_equal(again.action, data.action)
    assert again.text == data.text


def test_store_round_trip_and_npz_export(data, tmp_path, tiny_lm):
    from latentlab.hidden.extract import Extractor
    from latentlab.hidden.labelling import LabelConfig, label, prepare
    from latentlab.hidden.npz import REFERENCE_KEYS, export_npz

    write_transitions(tmp_path / "t.zarr", data, {"seed": 0}, batch_rows=64, shard_rows=128)
    back = read_transitions(tmp_path / "t.zarr")
    for key in ("episode", "step", "obs", "next_obs", "action", "reward", "done", "log_prob"):
        assert np.array_equal(back[key], getattr(data, key)), key
    cfg = LabelConfig(layers=[-1], tokens=2, batch_size=64, shard_rows=128)
    extractor = Extractor(*tiny_lm, cfg)
    job = prepare(extractor, "grid", data.table(), cfg, 0, {"source": "tiny"})
    label(extractor, job, tmp_path / "grid.zarr", tmp_path / "grid.parquet", tmp_path / "work")
    keys = export_npz(tmp_path / "grid.zarr", tmp_path / "g.npz", tmp_path / "grid.parquet", -1, tmp_path / "t.zarr")
    assert set(REFERENCE_KEYS) <= set(keys)
    with np.load(tmp_path / "g.npz", allow_pickle=False) as npz:
        assert npz["obs"].shape == (len(data), 28, 28, 3) and np.array_equal(npz["action"], data.action)
        assert np.array_equal(npz["log_prob"], data.log_prob)  # the behaviour policy's, not the LM's
        assert npz["hidden_state"].shape[0] == len(data) and len(npz["text_generated"]) == len(data)


def test_the_pretraining_corpus_mixes_in_grid_texts_only_when_asked():
    from latentlab.tasks.arithmetic import ArithmeticConfig, make_splits, pretraining_corpus

    problems = make_splits(ArithmeticConfig(operand_max=9, n_test=10), 0)["full"]
    texts = ["go to the red ball: red ball 2r1", "go to a grey key:"]
    plain = pretraining_corpus(problems, 40, 48, 0)
    assert pretraining_corpus(problems, 40, 48, 0, texts, 0.0) == plain  # share 0: the corpus of before
    mixed = pretraining_corpus(problems, 40, 48, 0, texts, 0.25)
    assert len(mixed) == 40 and sum(t.startswith("go to") for t in mixed) == 10
    assert mixed[:30] == pretraining_corpus(problems, 30, 48, 0)  # the equations part is drawn as before
