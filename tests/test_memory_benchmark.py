"""benchmarks/memory.py --quick runs every config in fresh processes (torchrun for 2 ranks, ddp and fsdp) through the
execution layer and reports every field (no timing or memory asserted: a 2-layer model says nothing about either)."""

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
    from benchmarks.memory import CONFIGS

    assert set(report["runs"]) == {f"{name}/{step}" for name, config in CONFIGS.items() for step in config[-1]}
    for name, run in report["runs"].items():
        ranks = 2 if "_2ranks" in name else 1
        assert len(run["peak_rss_mb_per_rank"]) == ranks and all(p > 0 for p in run["peak_rss_mb_per_rank"])
        assert len(run["before_step_mb_per_rank"]) == ranks and run["seconds_per_step"] > 0
        assert (run["activation_mb_per_rank"] is None) == name.endswith("/grpo")
    assert report["runs"]["bf16_weights/sft"]["params_dtype"] == "torch.bfloat16"
    # LoRA trains only its adapters: rank 8 on the 7 projections of each of the 2 layers, r (in + out) each
    lora, full = report["runs"]["lora/sft"]["trainable_params"], report["runs"]["full_fp32/sft"]["trainable_params"]
    assert 0 < lora < full / 10
    assert report["runs"]["fsdp_2ranks/sft"]["trainable_params"] == full  # a shard counts its whole parameter
    assert {"fsdp_over_ddp_peak_per_rank", "lora_over_full_peak", "full_over_checkpointing_activations"} <= set(
        report["ratios"]
    )
    assert all({"goal", "value", "goal_met"} <= set(ratio) for ratio in report["ratios"].values())
    assert all(ratio["value"] is not None for ratio in report["ratios"].values())
