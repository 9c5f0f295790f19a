"""latentlab: a reproducible pipeline for research on language-model hidden states.

The library holds every reusable piece (sampler, GRPO, training loops, data, metrics).
It never reads params.yaml and knows no DAG paths: stages/ does that.
"""

import os

# OpenMP threads that spin-wait for work collapse when another job shares the cores: on 2 cores, two
# training jobs of 2 threads each ran at 0.6 steps/s each against 3.1 alone; with passive waiting, 1.8
# each (benchmarks/threads.py). Threads that sleep cost a little alone and never collapse. libgomp reads
# this when torch loads it, so it must be set before `import torch`; an explicit setting still wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

# The same seed gives the same bytes on any x86-64 CPU: torch's, MKL's, oneDNN's and NumPy's kernels pinned to
# AVX2 unless LATENTLAB_NUMERICS=native (latentlab/common/numerics.py). NumPy reads its pin when it loads, so
# import latentlab before torch or NumPy.
from latentlab.common.numerics import pin  # noqa: E402

pin()

__version__ = "0.1.0"
