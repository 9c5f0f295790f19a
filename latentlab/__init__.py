"""latentlab: a reproducible pipeline for research on language-model hidden states.

The library holds every reusable piece (sampler, GRPO, training loops, data, metrics).
It never reads params.yaml and knows no DAG paths: stages/ does that.
"""

__version__ = "0.1.0"
