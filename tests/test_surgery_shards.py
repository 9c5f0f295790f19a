"""Attention surgery on FSDP2 shards (2 real processes: torchrun, gloo, CPU): tests/surgery_shards_run.py.

scale_heads edits each rank's rows of a sharded q/k/v/o weight (separate, fused Conv1D with a bias straddling
the ranks, interleaved per head), the SurgicalTheater snapshots and restores the shards bit for bit, its relative
change sums over them, a committed edit gathers to the plain model's edit, and a Learner's snapshot restores
shards, optimizer and schedule so that a step repeats bit for bit. The process group times out after 60 s, so a
collective that only one rank makes fails the run instead of hanging it.
"""

import os
import subprocess
import sys

from tests.dag import ROOT

ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "LATENTLAB_THREADS": "1"}


def test_surgery_on_fsdp_shards_equals_surgery_on_the_whole_model(tmp_path):
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    command += [str(ROOT / "tests" / "surgery_shards_run.py"), str(tmp_path)]
    result = subprocess.run(command, env=ENV, capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr[-4000:]
    assert (tmp_path / "ok").read_text() == "ok\n"
