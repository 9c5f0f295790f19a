"""benchmarks/memory.py --quick runs every wired config in fresh processes (torchrun for 2 ranks) and reports every
field (no timing or memory asserted: a 2-layer model says nothing about either)."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_quick_memory_benchmark_reports_every_field():
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "memory.py"), "--quick", "--threads", "1"],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout)
    assert report["model"]["params"] > 0 and report["model"]["vocab_size"] == 151936
    wired = {"full_fp32/sft", "full_fp32/grpo", "bf16_weights/sft", "bf16_weights/grpo", "full_fp32_long/sft"}
    assert set(report["runs"]) == wired | {"checkpointing/sft", "ddp_2ranks/sft"}
    assert set(report["pending"]) == {"fsdp_2ranks/sft", "lora/sft", "lora/grpo", "lora_checkpointing/sft"}
    for name, run in report["runs"].items():
        ranks = 2 if name.startswith("ddp_2ranks") else 1
        assert len(run["peak_rss_mb_per_rank"]) == ranks and all(p > 0 for p in run["peak_rss_mb_per_rank"])
        assert len(run["before_step_mb_per_rank"]) == ranks and run["seconds_per_step"] > 0
        assert (run["activation_mb_per_rank"] is None) == name.endswith("/grpo")
    assert report["runs"]["bf16_weights/sft"]["params_dtype"] == "torch.bfloat16"
    assert set(report["ratios"]) == {
        "fsdp_over_ddp_peak_per_rank",
        "lora_over_full_peak",
        "full_over_checkpointing_activations",
        "bf16_over_fp32_peak",
    }
    assert all({"goal", "value", "goal_met"} <= set(ratio) for ratio in report["ratios"].values())
    assert report["ratios"]["full_over_checkpointing_activations"]["value"] is not None
