"""The NLA stages and surgery under torchrun (2 CPU processes, gloo, DDP and FSDP2) against one process, 2 shards.

The contract of tests/test_ddp.py: a run on N processes equals, step by step within float tolerance, one
process given the same global batch cut into the same N seeded shards (`launcher.shards`). The actor's
injection map is a learned projection here (`mode: project`), so the actor trains two modules under DDP.
"""

import json
import shutil

import pytest

from tests.dag import ROOT, TINY
from tests.test_ddp import (  # noqa: F401
    STRATEGIES,
    assert_same_logs,
    assert_same_weights,
    copy,
    project,
    set_params,
    stage,
)

NLA_RL_COLUMNS = [
    "reward_mean",
    "reward_std",
    "loss",
    "grad_norm",
    "mse",
    "cosine",
    "fve",
    "explanation_chars",
    "critic_loss",
]


@pytest.fixture(scope="module")
def nla_project(tmp_path_factory):
    """Tiny params, data/synth, the tiny model as models/base, its labels and one single-process nla_sft."""
    from latentlab.lm.modeling import save_lm
    from tests.tiny import new_tiny_lm

    directory = tmp_path_factory.mktemp("ddp_nla")
    shutil.copy(ROOT / "params.yaml", directory / "params.yaml")
    set_params(directory, **TINY, device="cpu")
    set_params(directory, nla_sft={"actor": {**TINY["nla_sft"]["actor"], "mode": "project"}})
    model, tokenizer = new_tiny_lm(max_positions=TINY["model"]["max_positions"])
    save_lm(model, tokenizer, directory / "models" / "base")
    for name in ("synth", "grid", "label", "nla_table", "nla_sft"):
        stage(directory, name)
    return directory


def assert_same_pair(a, b, stage_name):
    for name in ("actor/model.safetensors", "actor/nla_injector.safetensors", "critic/nla_critic.safetensors"):
        assert_same_weights(a / "models" / stage_name / name, b / "models" / stage_name / name)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_nla_sft_on_two_processes_matches_one(nla_project, tmp_path, strategy):
    two = copy(nla_project, tmp_path, "two", nproc=2, strategy=strategy)
    stage(two, "nla_sft")
    columns = ["actor_loss", "actor_grad_norm", "critic_loss", "critic_grad_norm", "critic_fve"]
    assert_same_logs(nla_project / "plots/nla_sft.csv", two / "plots/nla_sft.csv", columns)
    assert_same_pair(nla_project, two, "nla_sft")


@pytest.mark.parametrize("algo", ["grpo", "ppo"])
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_nla_rl_on_two_processes_matches_one_process_with_two_shards(nla_project, tmp_path, algo, strategy):
    one, two = (
        copy(nla_project, tmp_path, "one", shards=2),
        copy(nla_project, tmp_path, "two", nproc=2, strategy=strategy),
    )
    for directory in (one, two):
        set_params(directory, nla_rl={"algo": algo})
        stage(directory, "nla_rl")
    columns = [*NLA_RL_COLUMNS, "value_loss", "value_mean"] if algo == "ppo" else [*NLA_RL_COLUMNS, "kl"]
    assert_same_logs(one / "plots/nla_rl.csv", two / "plots/nla_rl.csv", [*columns, "heldout_fve", "heldout_cosine"])
    assert_same_pair(one, two, "nla_rl")
    if algo == "ppo":
        assert_same_weights(one / "models/nla_rl/value_head.safetensors", two / "models/nla_rl/value_head.safetensors")


def test_a_ppo_batch_that_does_not_split_into_the_shards_is_refused_naming_the_key(nla_project, tmp_path):
    three = copy(nla_project, tmp_path, "three", shards=3)  # nla_rl.ppo.rollouts_per_step is 8
    set_params(three, nla_rl={"algo": "ppo"})
    result = stage(three, "nla_rl", check=False)
    assert result.returncode == 2
    assert "nla_rl.ppo.rollouts_per_step (8) is not divisible by the 3 shards" in result.stderr
    assert not (three / "models/nla_rl").exists()


SURGERY_COLUMNS = ["reward_mean", "loss", "grad_norm", "surgery_reward", "probe_log_likelihood", "commits"]


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_surgery_on_two_processes_matches_one_process_with_two_shards(project, tmp_path, strategy):  # noqa: F811
    """GRPO phases sharded as `grpo`, the probe batch split, an identical SAC replica on every rank; every arm
    restored from the phase-1 snapshot (fsdp: each rank's shards), the edits made on each rank's rows. Every
    phase-3 edit is kept (a threshold no reward misses), so the saved weights hold committed edits."""
    one, two = copy(project, tmp_path, "one", shards=2), copy(project, tmp_path, "two", nproc=2, strategy=strategy)
    for directory in (one, two):
        set_params(directory, surgery={"commit_threshold": -1e9})
        stage(directory, "surgery")
    assert json.loads((two / "metrics/surgery.json").read_text())["sac"]["commits"] > 0
    columns = [*SURGERY_COLUMNS, "action_magnitude", "q1_loss", "actor_loss", "heldout_accuracy", "edit_relative_norm"]
    assert_same_logs(one / "plots/surgery.csv", two / "plots/surgery.csv", columns)
    arms = ["sac_reward_mean", "random_surgery_reward", "grpo_only_reward_mean"]
    assert_same_logs(one / "plots/surgery_arms.csv", two / "plots/surgery_arms.csv", arms)
    for name in ("model.safetensors", "surgeon.safetensors"):
        assert_same_weights(one / "models/surgery" / name, two / "models/surgery" / name)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_policy_on_two_processes_matches_one(nla_project, tmp_path, strategy):
    """AWR: each minibatch split across the ranks (no sampling: the plain one-process run is the reference)."""
    one, two = copy(nla_project, tmp_path, "one"), copy(nla_project, tmp_path, "two", nproc=2, strategy=strategy)
    for directory in (one, two):
        stage(directory, "policy")
    columns = [f"{arm}_{name}" for arm in ("hidden", "obs") for name in ("loss", "value_loss", "weight_mean")]
    assert_same_logs(one / "plots/policy.csv", two / "plots/policy.csv", columns)
    for arm in ("hidden", "obs"):
        (weights,) = (one / "models/policy" / arm).glob("*.safetensors")
        assert_same_weights(weights, two / "models/policy" / arm / weights.name)
