"""keep_freed_memory: once each batch shape has run, forward passes take no fresh pages from the kernel."""

import json
import platform
import subprocess
import sys

import pytest

from tests.label_fixtures import ENV

# forward passes of a small model over batches of four lengths, in a fresh interpreter (the heap's state is
# per process): the minor page faults of each pass
FORWARD_PASSES = """
import json, resource, sys, torch
from latentlab.common.heap import keep_freed_memory
from latentlab.lm.modeling import TinyLMConfig, build_tiny_lm
from latentlab.lm.tokenizer import build_char_tokenizer

torch.set_num_threads(1)
if sys.argv[1] == "keep":
    assert keep_freed_memory()
cfg = TinyLMConfig(hidden_size=64, layers=2, heads=4, intermediate_size=256, max_positions=64)
model = build_tiny_lm(cfg, build_char_tokenizer())
faults = []
with torch.no_grad():
    for step in range(12):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        model(input_ids=torch.randint(5, 30, (256, 12 + step % 4 * 5)), use_cache=False)
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps(faults))
"""


def page_faults_per_pass(setting: str) -> list[int]:
    run = subprocess.run(
        [sys.executable, "-c", FORWARD_PASSES, setting], env=ENV, capture_output=True, text=True, check=True
    )
    return json.loads(run.stdout.splitlines()[-1])


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_batches_reuse_freed_pages():
    """By default glibc hands the freed activations back at the end of a pass and the next pass faults them
    in again (tens of thousands of faults a pass here, varying run to run); kept, a pass after the first
    four (one of each length) faults in almost nothing."""
    faults = page_faults_per_pass("keep")
    first, later = faults[0], sorted(faults[4:])
    assert first > 1000  # the first pass does take its pages: the count measures something
    assert later[len(later) // 2] <= first // 100, faults
