"""The model and execution params end to end, on the real stages: LoRA under FSDP2 on 2 processes against one
process, and bf16 weights with activation checkpointing (tiny params, CPU)."""

import pytest
import torch
from safetensors.torch import load_file

from tests.test_ddp import assert_same_logs, assert_same_weights, copy, project, set_params, stage  # noqa: F401

LORA = {"adapter": "lora", "lora": {"rank": 4, "alpha": 8.0, "dropout": 0.0, "target_modules": None}}


def test_lora_sft_under_fsdp_on_two_processes_matches_one(project, tmp_path):  # noqa: F811
    """The adapters train on sharded blocks; the saved adapter and the merged weights equal one process's."""
    one = copy(project, tmp_path, "one")
    two = copy(project, tmp_path, "two", nproc=2, strategy="fsdp")
    for directory in (one, two):
        set_params(directory, model=LORA)
        stage(directory, "sft")
    assert_same_logs(one / "plots/sft.csv", two / "plots/sft.csv", ["loss", "grad_norm", "lr"])
    for name in ("adapter/adapter_model.safetensors", "model.safetensors"):
        assert_same_weights(one / "models/sft" / name, two / "models/sft" / name)
    adapter = load_file(two / "models/sft/adapter/adapter_model.safetensors")
    assert adapter and all("lora_" in name for name in adapter)  # the adapters alone


@pytest.mark.slow
def test_bf16_weights_with_checkpointing_train_sft_and_grpo(project, tmp_path):  # noqa: F811
    """model.dtype bfloat16 + gpu.gradient_checkpointing: both stages train (finite losses, moving weights) and
    save bf16 weights; the fp32 default's outputs are not those."""
    run = copy(project, tmp_path, "bf16")
    set_params(run, gpu={"gradient_checkpointing": True})
    set_params(run, model={"dtype": "bfloat16"})
    for name in ("sft", "grpo"):
        stage(run, name)
    sft, base = load_file(run / "models/sft/model.safetensors"), load_file(project / "models/base/model.safetensors")
    assert {value.dtype for value in sft.values()} == {torch.bfloat16}
    assert any(not torch.equal(sft[name], base[name].to(torch.bfloat16)) for name in sft)
    grpo = load_file(run / "models/grpo/model.safetensors")
    assert any(not torch.equal(grpo[name], sft[name]) for name in grpo)
    log = (run / "plots/grpo.csv").read_text().splitlines()
    loss = log[0].split(",").index("loss")
    assert all(row.split(",")[loss] not in ("nan", "inf", "") for row in log[1:])
