"""Training stages under torchrun (2 CPU processes, gloo; DDP and FSDP2, `launcher.strategy`) against one process.

The contract (latentlab/common/distributed.py): a run on N processes equals, step by step within float
tolerance, one process given the same global batch cut into the same N seeded shards (`launcher.shards`).
SFT has no sampling, so its reference is the plain single-process run. The stages are the real ones, run as
`python -m stages.<name>` with `launcher.nproc: 2`, so the launcher's re-execution under torchrun is tested too.
"""

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import polars as pl
import pytest
import torch
from ruamel.yaml import YAML
from safetensors.torch import load_file

from tests.dag import ROOT, TINY

ENV = {
    **os.environ,
    "PYTHONPATH": str(ROOT),
    "WANDB_MODE": "disabled",
    "LATENTLAB_THREADS": "1",
    "OMP_NUM_THREADS": "1",
}
ENV.pop("LATENTLAB_DEBUG", None)
STRATEGIES = ("ddp", "fsdp")  # launcher.strategy: DDP, or FSDP2 sharding each decoder block (and a small add-on whole)


def set_params(directory: Path, **sections) -> None:
    yaml, path = YAML(), directory / "params.yaml"
    data = yaml.load(path.read_text())
    for section, values in sections.items():
        if isinstance(values, dict):
            data[section].update(values)
        else:
            data[section] = values
    with path.open("w") as handle:
        yaml.dump(data, handle)


def stage(directory: Path, name: str, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [sys.executable, "-m", f"stages.{name}"], cwd=directory, env=ENV, capture_output=True, text=True, timeout=300
    )
    if check and result.returncode:
        raise AssertionError(f"stages.{name} exited {result.returncode}\n{result.stderr[-4000:]}")
    return result


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """Tiny params, data/synth, the tiny model as models/base and one single-process `sft` run (models/sft)."""
    from latentlab.lm.modeling import save_lm
    from tests.tiny import new_tiny_lm

    directory = tmp_path_factory.mktemp("ddp")
    shutil.copy(ROOT / "params.yaml", directory / "params.yaml")
    set_params(directory, **TINY, device="cpu")
    model, tokenizer = new_tiny_lm(max_positions=TINY["model"]["max_positions"])
    save_lm(model, tokenizer, directory / "models" / "base")
    stage(directory, "synth")
    stage(directory, "sft")
    return directory


def copy(project: Path, tmp_path: Path, name: str, **launcher) -> Path:
    directory = tmp_path / name
    shutil.copytree(project, directory, ignore=shutil.ignore_patterns("plots", "dvclive"))
    set_params(directory, launcher=launcher)
    return directory


def assert_same_logs(a: Path, b: Path, columns: list[str]) -> None:
    one, two = pl.read_csv(a).fill_null(-1.0), pl.read_csv(b).fill_null(-1.0)  # held-out columns: eval steps only
    assert one["step"].to_list() == two["step"].to_list()
    for column in columns:
        assert one[column].to_list() == pytest.approx(two[column].to_list(), rel=1e-4, abs=1e-6), column


def assert_same_weights(a: Path, b: Path) -> None:
    one, two = load_file(a), load_file(b)
    assert one.keys() == two.keys()
    for name in one:
        torch.testing.assert_close(
            one[name], two[name], rtol=1e-4, atol=1e-5, msg=name
        )  # AdamW magnifies last-bit gradient differences


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_sft_on_two_processes_matches_one(project, tmp_path, strategy):
    two = copy(project, tmp_path, "two", nproc=2, strategy=strategy)
    result = stage(two, "sft")
    assert "torch.distributed.run --standalone --nproc-per-node=2 -m stages.sft" in result.stderr
    assert_same_logs(project / "plots/sft.csv", two / "plots/sft.csv", ["loss", "grad_norm", "lr"])
    assert_same_weights(project / "models/sft/model.safetensors", two / "models/sft/model.safetensors")
    assert not (two / "dvclive" / "sft" / "rank1").exists()


GRPO_COLUMNS = ["reward_mean", "reward_std", "advantage_std", "loss", "grad_norm", "completion_tokens", "lr"]


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_grpo_on_two_processes_matches_one_process_with_two_shards(project, tmp_path, strategy):
    one, two = copy(project, tmp_path, "one", shards=2), copy(project, tmp_path, "two", nproc=2, strategy=strategy)
    plain = copy(project, tmp_path, "plain")
    # token aggregation: the loss divides by the global token count, which the ranks all-reduce
    for directory in (one, two, plain):
        set_params(directory, grpo={"loss_aggregation": "token"})
        stage(directory, "grpo")
    assert_same_logs(one / "plots/grpo.csv", two / "plots/grpo.csv", [*GRPO_COLUMNS, "heldout_accuracy"])
    assert_same_weights(one / "models/grpo/model.safetensors", two / "models/grpo/model.safetensors")
    # the shards' streams matter: one shard (the single-process default) samples other completions
    assert pl.read_csv(plain / "plots/grpo.csv")["grad_norm"].to_list() != pytest.approx(
        pl.read_csv(one / "plots/grpo.csv")["grad_norm"].to_list()
    )


@pytest.mark.slow
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_inject_on_two_processes_matches_one_process_with_two_shards(project, tmp_path, strategy):
    one, two = copy(project, tmp_path, "one", shards=2), copy(project, tmp_path, "two", nproc=2, strategy=strategy)
    for directory in (one, two):
        stage(directory, "inject")
    assert_same_logs(one / "plots/inject.csv", two / "plots/inject.csv", [*GRPO_COLUMNS, "l2_reg"])
    assert_same_weights(one / "models/inject/injector.safetensors", two / "models/inject/injector.safetensors")


def test_a_batch_that_does_not_split_into_the_shards_is_refused_naming_the_key(project, tmp_path):
    three = copy(project, tmp_path, "three", shards=3)  # grpo.prompts_per_step is 4
    result = stage(three, "grpo", check=False)
    assert result.returncode == 2
    assert "grpo.prompts_per_step (4) is not divisible by the 3 shards" in result.stderr
    assert not (three / "models/grpo").exists()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_a_failing_rank_takes_the_job_down_with_its_error(project, tmp_path):
    """Two "nodes" of one process each (c10d rendezvous on localhost); the second lacks models/sft.

    Its rank exits with the stage's error; the other is blocked in DDP's first collective and must not hang.
    """
    good, bad = copy(project, tmp_path, "good"), copy(project, tmp_path, "bad")
    shutil.rmtree(bad / "models" / "sft")
    command = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc-per-node=1"]
    command += ["--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{free_port()}", "--max-restarts=0"]
    started = time.perf_counter()
    nodes = [
        subprocess.Popen(
            [*command, "-m", "stages.grpo"],
            cwd=cwd,
            env=ENV,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for cwd in (good, bad)
    ]
    outputs = [node.communicate(timeout=180)[0] for node in nodes]
    assert time.perf_counter() - started < 180
    assert all(node.returncode != 0 for node in nodes), outputs
    assert "error: models/sft does not exist" in outputs[1]
    assert "stages.grpo FAILED" in outputs[1]  # torchrun's summary of the failed worker
    # the healthy node fails too: its worker with the closed gloo connection, or its agent with the rendezvous
    # store that the failed node's agent took down with it (which one comes first varies)
    assert not (good / "models" / "grpo").exists()


def test_precision_is_fp32_on_the_cpu_and_validated(tmp_path):
    from latentlab.common import runtime
    from stages.params import Params, ParamsError, load_params

    assert runtime.set_precision("auto", "cpu") is None
    assert not torch.is_autocast_enabled("cpu")
    with runtime.autocast():
        assert torch.mm(torch.ones(2, 2), torch.ones(2, 2)).dtype == torch.float32
    with pytest.raises(ValueError, match="gpu.precision 'bf16' needs a CUDA device"):
        runtime.set_precision("bf16", "cpu")
    runtime.set_precision("auto", "cpu")
    x = torch.arange(4)
    assert runtime.to_device(x, "cpu") is x  # no pinning, no copy on the CPU
    default = Params.model_fields["gpu"].default
    assert default.precision == "auto"
    path = ROOT / "params.yaml"
    assert load_params(path).gpu.precision == "auto"
    for old, new, error in [
        ("  precision: auto ", "  precision: fp16 ", "gpu.precision"),
        ("  nnodes: 1 ", "  nnodes: 2 ", "launcher.rdzv_endpoint"),
    ]:
        (tmp_path / "params.yaml").write_text(path.read_text().replace(old, new))
        with pytest.raises(ParamsError, match=error):
            load_params(tmp_path / "params.yaml")
