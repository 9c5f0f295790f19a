"""Step-0 measurements of injection variants (no training): held-out accuracy of a policy as built,
and the norm variant's accuracy over a sweep of virtual-token norms."""

from collections.abc import Callable

import numpy as np
import polars as pl
import torch

from latentlab.lm.prompt_format import RAW, PromptFormat
from latentlab.policies.injection import InjectionPolicy, InjectorConfig, build_injector
from latentlab.tasks.evaluation import evaluate_policy

KEYS = ("accuracy", "accuracy_odd", "accuracy_even")


def accuracy(policy, problems: pl.DataFrame, reward_fn: Callable, batch_size: int, max_new_tokens: int, desc: str):
    """Greedy exact-match accuracy overall / odd / even (the `evaluate` harness)."""
    policy.train(False)
    metrics, _ = evaluate_policy(policy, problems, reward_fn, batch_size, max_new_tokens, desc)
    return {k: metrics[k] for k in KEYS}


@torch.no_grad()
def mean_hidden_norm(policy: InjectionPolicy, prompts: list[str]) -> float:
    """Mean L2 norm of h (the injector's input: layer `layer` at the prompt's last position) over `prompts`."""
    rollout = policy.encode(prompts)
    policy.prepare(rollout)
    return rollout.extras["hidden"].norm(dim=-1).mean().item()


def norm_sweep(
    model,
    tokenizer,
    cfg: InjectorConfig,
    prompts: list[str],
    problems: pl.DataFrame,
    reward_fn: Callable,
    batch_size: int,
    max_new_tokens: int,
    points: int,
    prompt_format: PromptFormat = RAW,
) -> pl.DataFrame:
    """Step-0 accuracy of the norm variant at `points` log-spaced norms, from the embedding rows' mean
    L2 norm to the mean norm of h over `prompts` -> columns scale, accuracy, accuracy_odd, accuracy_even."""
    base = cfg.model_copy(update={"variant": "norm", "output_norm": False, "scale": None})
    low = build_injector(model, base, tokenizer).scale.item()
    policy = InjectionPolicy(model, tokenizer, build_injector(model, base, tokenizer), prompt_format=prompt_format)
    high = mean_hidden_norm(policy, prompts)
    rows = []
    for scale in np.geomspace(low, high, points) if points else []:
        injector = build_injector(model, base.model_copy(update={"scale": float(scale)}), tokenizer)
        policy = InjectionPolicy(model, tokenizer, injector, prompt_format=prompt_format)
        scores = accuracy(policy, problems, reward_fn, batch_size, max_new_tokens, f"norm {scale:.3g}")
        rows.append({"scale": float(scale), **scores})
    schema = {"scale": pl.Float64, **{k: pl.Float64 for k in KEYS}}
    return pl.DataFrame(rows, schema=schema)
