"""Natural language autoencoders: the NLA table's schema, the actor's injection (modes, layers, hooks, KV
cache), the critic (truncation, identity head; its pooling: tests/test_pooling.py), save/load, and short real
GRPO runs on the critic's reward."""

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from latentlab.common.errors import InputError
from latentlab.common.execution import Loop
from latentlab.common.tables import TableWriter
from latentlab.common.tracking import StepLog
from latentlab.hidden.nla_table import nla_schema, read_nla_table
from latentlab.lm.sampling import SamplingConfig
from latentlab.policies.lm_policy import LMPolicy
from latentlab.policies.nla_actor import NLAActor, NLAActorConfig, VectorInjector, load_actor, save_actor
from latentlab.policies.nla_critic import (
    NLACriticConfig,
    build_critic,
    load_critic,
    reconstruct,
    reconstruction_loss,
    save_critic,
)
from latentlab.rl.grpo import GRPOConfig, GRPOTrainer
from latentlab.rl.nla import CriticReward, CriticTrainer, CriticUpdates, reward_from_mse, train_rl
from tests.tiny import new_tiny_lm

H = 32
TEXTS = ["12+7=19\n3+4=", "40-9=31", "1+1=2\n"]


def _actor(mode="replace", layers=(0,), dim=H, scale=4.0, model=None):
    model, tokenizer = model or new_tiny_lm(embedding_scale=4.0)
    cfg = NLAActorConfig(mode=mode, layers=list(layers), center=False)
    torch.manual_seed(3)
    injector = VectorInjector(dim, H, cfg, [scale] * len(layers), torch.zeros(dim))
    return NLAActor(model, tokenizer, injector)


def _vectors(n, dim=H, seed=0):
    return list(torch.randn(n, dim, generator=torch.Generator().manual_seed(seed)).numpy())


# ---------------------------------------------------------------- the table


def test_the_nla_table_streams_row_groups_and_reads_back_without_a_copy_per_row(tmp_path):
    path = tmp_path / "nla.parquet"
    vectors = np.arange(5 * 4, dtype=np.float32).reshape(5, 4)
    with TableWriter(path, nla_schema(4)) as writer:
        for lo in (0, 3):
            rows = range(lo, min(5, lo + 3))
            writer.write(
                {
                    "id": list(rows),
                    "prompt": [f"{i}+1=" for i in rows],
                    "response": [f"{i}+1={i + 1}" for i in rows],
                    "activation_vector": vectors[lo : lo + 3],
                }
            )
    assert pq.ParquetFile(path).num_row_groups == 2
    table, read = read_nla_table(path)
    assert table.schema.field("activation_vector").type == pa.list_(pa.float32(), 4)
    np.testing.assert_array_equal(read, vectors)
    assert read.dtype == np.float32 and not read.flags.owndata  # a view of the Arrow buffer


@pytest.mark.parametrize(
    "column, arrow_type, named",
    [
        ("activation_vector", pa.list_(pa.float64()), "activation_vector"),
        ("prompt", pa.int64(), "prompt"),
    ],
)
def test_a_table_of_another_schema_is_refused_naming_the_column(tmp_path, column, arrow_type, named):
    columns = {
        "id": pa.array([0], pa.int64()),
        "prompt": pa.array(["1+1="]),
        "response": pa.array(["1+1=2"]),
        "activation_vector": pa.array([[1.0, 2.0]], pa.list_(pa.float32(), 2)),
    }
    columns[column] = pa.array([[1.0, 2.0]] if column == "activation_vector" else [7], arrow_type)
    pq.write_table(pa.table(columns), tmp_path / "bad.parquet")
    with pytest.raises(InputError, match=named):
        read_nla_table(tmp_path / "bad.parquet")


# ---------------------------------------------------------------- the actor


MODES = [("replace", (0,)), ("add", (0,)), ("project", (0,)), ("replace", (1,)), ("add", (1,)), ("project", (0, 1))]


@pytest.mark.parametrize("mode, layers", MODES)
def test_every_mode_and_layer_changes_the_output_when_the_vector_changes(mode, layers):
    actor = _actor(mode, layers)
    a, b = _vectors(2)
    rollout = actor.teacher_forced([a, a], TEXTS[:2])
    changed = actor.teacher_forced([a, b], TEXTS[:2])
    with torch.no_grad():
        same, other = actor.logprobs(rollout, 1.0), actor.logprobs(changed, 1.0)
    assert torch.equal(same[0], other[0])
    assert (same[1] - other[1]).abs().max() > 1e-3


@pytest.mark.parametrize("group_size", [1, 3])
@pytest.mark.parametrize("mode, layers", MODES + [("project", (1,))])
def test_the_injection_survives_kv_cached_sampling(mode, layers, group_size):
    """Log-probs the cached sampler recorded equal a teacher-forced re-score of the same tokens: the
    vector was in the cache (prefix pass) and is applied once, at <INJECT>, in both. With groups, the
    prefix runs once per vector in both passes (the completions' pass must not be edited), and the
    shared re-score equals the unshared one."""
    actor = _actor(mode, layers)
    rollout = actor.rollout(
        _vectors(4), SamplingConfig(max_new_tokens=8), torch.Generator().manual_seed(0), group_size=group_size
    )
    assert rollout.completions.ids.shape[0] == 4 * group_size
    with torch.no_grad():
        rescored = actor.logprobs(rollout, 1.0)
        unshared = actor.logprobs(rollout.select(torch.arange(4 * group_size)), 1.0)
    torch.testing.assert_close(rescored, rollout.completions.logprobs, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(unshared, rescored, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("layers", [(0,), (1,)])
def test_adding_a_zero_vector_changes_nothing(layers):
    model = new_tiny_lm(embedding_scale=4.0)
    actor = _actor("add", layers, model=model)
    plain = LMPolicy(*model)
    rollout = actor.teacher_forced([np.zeros(H, dtype=np.float32)], TEXTS[:1])
    with torch.no_grad():
        torch.testing.assert_close(actor.logprobs(rollout, 1.0), plain.logprobs(rollout, 1.0))


def test_hooks_touch_only_the_marked_position_and_are_removed_after():
    actor = _actor("replace", (1,))
    block0, block1 = actor._blocks[0], actor._blocks[1]
    seen = {}
    h0 = block0.register_forward_hook(
        lambda m, a, out: seen.__setitem__("out0", out[0] if isinstance(out, tuple) else out)
    )
    h1 = block1.input_layernorm.register_forward_pre_hook(lambda m, a: seen.__setitem__("in1", a[0]))
    try:
        with torch.no_grad():
            actor.logprobs(actor.teacher_forced(_vectors(2), TEXTS[:2]), 1.0)
    finally:
        h0.remove(), h1.remove()
    differs = (seen["out0"] - seen["in1"]).abs().amax(-1) > 0  # (B, T): where block 1's input was edited
    expected = torch.zeros_like(differs)
    expected[:, actor.column] = True
    assert torch.equal(differs, expected)
    assert not block1._forward_pre_hooks and not block0._forward_pre_hooks
    with pytest.raises(RuntimeError), actor.hooks(torch.zeros(1, H)):
        assert block1._forward_pre_hooks
        raise RuntimeError("a failure inside the call")
    assert not block1._forward_pre_hooks


def test_injected_vectors_have_the_fixed_norm_whatever_the_input_norm():
    actor = _actor("project", (0,), dim=16, scale=2.5)
    v = torch.randn(3, 16) * torch.tensor([[0.01], [1.0], [100.0]])
    norms = actor.injector(v, 0).norm(dim=-1)
    torch.testing.assert_close(norms, torch.full((3,), 2.5))


def test_the_template_needs_exactly_one_inject_token():
    model, tokenizer = new_tiny_lm()
    injector = VectorInjector(H, H, NLAActorConfig(template="no slot"), [1.0], torch.zeros(H))
    with pytest.raises(ValueError, match="exactly one"):
        NLAActor(model, tokenizer, injector)


# ---------------------------------------------------------------- the critic


def test_the_critic_is_the_base_truncated_at_the_layer_with_an_identity_head():
    """On the targets' scale: head(h) = (h - mu) / sigma, sigma the RMS norm of the centred training vectors."""
    model, tokenizer = new_tiny_lm()
    vectors = (1 + 3 * np.random.default_rng(0).normal(size=(6, H))).astype(np.float32)
    critic = build_critic(model, tokenizer, NLACriticConfig(layer=1, pooling="mean"), vectors)
    mean = torch.tensor(vectors.mean(0))
    sigma = (torch.tensor(vectors) - mean).pow(2).sum(-1).mean().sqrt()
    torch.testing.assert_close(critic.scale, sigma)
    torch.testing.assert_close(critic.head.weight, torch.eye(H) / sigma)
    torch.testing.assert_close(critic.head.bias, -mean / sigma)
    assert len(critic.encoder.layers) == 1
    ids, mask = critic.encode(TEXTS[:1])
    with torch.no_grad():
        state = model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[1]
        torch.testing.assert_close(critic(ids, mask), (state.mean(1) - mean) / sigma)


@pytest.mark.parametrize("how", ["last", "max", "weighted"])
def test_a_batch_reads_each_text_as_alone(how):
    model, tokenizer = new_tiny_lm()
    critic = build_critic(model, tokenizer, NLACriticConfig(layer=2, pooling=how), np.array(_vectors(2)))
    with torch.no_grad():
        torch.nn.init.normal_(critic.score)
        batch = critic.predict(TEXTS)
        alone = torch.cat([critic.predict([t]) for t in TEXTS])
    torch.testing.assert_close(batch, alone, atol=1e-5, rtol=1e-5)


def test_reconstruction_losses_by_hand():
    """On the raw prediction (no normalisation): the norm counts, except for the direction-only cosine loss."""
    pred, target = torch.tensor([[2.0, 0.0]]), torch.tensor([[0.0, 1.0]])  # orthogonal
    assert reconstruction_loss(pred, target, "mse").item() == pytest.approx(5.0)  # 2^2 + 1^2
    assert reconstruction_loss(pred, target, "cosine").item() == pytest.approx(1.0)
    assert reconstruction_loss(pred, target, "smooth_l1").item() == pytest.approx(2.0)  # (2 - 0.5) + 0.5 * 1^2
    assert reconstruction_loss(3 * target, target, "cosine").item() == pytest.approx(0.0)
    assert reconstruction_loss(3 * target, target, "mse").item() == pytest.approx(4.0)
    mse = torch.tensor([0.0, 1.0, 2.0])
    torch.testing.assert_close(reward_from_mse(mse, "neg_mse"), -mse)
    torch.testing.assert_close(reward_from_mse(mse, "inverse"), torch.tensor([1.0, 0.5, 1 / 3]))


def test_an_empty_explanation_earns_the_reward_of_the_mean_predictor():
    """t_hat = 0 (v_hat = the training mean): its error is ||t||^2 on its row, unless the critic is made to read it."""
    model, tokenizer = new_tiny_lm()
    critic = build_critic(model, tokenizer, NLACriticConfig(layer=1), np.array(_vectors(4)))
    vectors = np.array(_vectors(2, seed=1))
    own = critic.target(vectors).pow(2).sum(-1)
    scores = reconstruct(critic, ["", "1+1=2"], vectors)
    assert scores.mse[0].item() == pytest.approx(own[0].item()) and scores.cosine[0].item() == 0.0
    assert scores.mse[1].item() != pytest.approx(own[1].item())
    assert reconstruct(critic, [" "], vectors[:1], read_empty=True).mse.item() != pytest.approx(own[0].item())


# ---------------------------------------------------------------- save / load


def test_the_saved_actor_and_critic_reload_identical(tmp_path):
    actor = _actor("project", (0, 1), dim=16)
    rollout = actor.teacher_forced(_vectors(2, 16), TEXTS[:2])
    save_actor(actor, tmp_path / "actor")
    again = load_actor(tmp_path / "actor")
    assert again.injector.cfg == actor.injector.cfg
    with torch.no_grad():
        torch.testing.assert_close(again.logprobs(rollout, 1.0), actor.logprobs(rollout, 1.0))

    model, tokenizer = new_tiny_lm()
    vectors = np.random.default_rng(0).normal(size=(4, H)).astype(np.float32)
    critic = build_critic(model, tokenizer, NLACriticConfig(layer=1, pooling="weighted"), vectors)
    torch.nn.init.normal_(critic.score)
    save_critic(critic, tmp_path / "critic")
    assert not list((tmp_path / "critic").glob("*.bin")) and not list((tmp_path / "critic").glob("*.pt"))
    reloaded = load_critic(tmp_path / "critic")
    assert reloaded.scale.item() == critic.scale.item()
    with torch.no_grad():
        torch.testing.assert_close(reloaded.predict(TEXTS), critic.predict(TEXTS))


# ---------------------------------------------------------------- a short real run


@pytest.mark.slow  # a real training run: ~30 s on a shared 2-core machine
def test_a_short_grpo_run_raises_the_critics_reward():
    torch.manual_seed(0)
    model = new_tiny_lm(embedding_scale=4.0)
    actor = _actor("replace", (0,), model=model)
    critic_model, tokenizer = new_tiny_lm()
    # on the scale of the critic model's layer-1 states (pooled norm ~0.07), as real activations are: the critic's
    # identity start then reads a text as t_hat of norm ~1, and which text the actor writes moves the reward
    vectors = (0.0125 * np.random.default_rng(0).normal(size=(8, H))).astype(np.float32)
    critic = build_critic(critic_model, tokenizer, NLACriticConfig(layer=1, center=False), vectors)
    reward = CriticReward(critic, "neg_mse")
    cfg = GRPOConfig(steps=12, prompts_per_step=4, group_size=8, max_new_tokens=6, lr=1e-2)
    trainer = GRPOTrainer(actor, reward, cfg, torch.Generator().manual_seed(0))
    critic_trainer = CriticTrainer(critic, CriticUpdates(lr=1e-9, updates_per_step=0), cfg.steps)
    batches = (list(vectors[i : i + 4]) for _ in range(cfg.steps) for i in (0,))  # the same 4 vectors each step
    log = StepLog()
    train_rl(trainer, reward, critic_trainer, batches, steps=cfg.steps, loop=Loop(log=log, desc="test"))
    rewards = [row["reward_mean"] for row in log.rows]
    assert {"mse", "cosine", "fve", "explanation_chars", "kl", "loss", "tokens_per_s"} <= set(log.rows[0])
    assert np.mean(rewards[-3:]) > np.mean(rewards[:3]) + 0.05
