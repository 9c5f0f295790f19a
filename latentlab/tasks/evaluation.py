"""One harness scores every model on the same held-out problems.

Greedy completions, the leading integer of each is the prediction; the metrics are exact-match
accuracy overall and by the parity of the true answer, the mean absolute error of parseable
predictions, the share of predictions that parse and that are even, and the task reward.
"""

from collections.abc import Callable

import numpy as np
import polars as pl

from latentlab.common.tracking import progress
from latentlab.policies.lm_policy import LMPolicy
from latentlab.tasks.arithmetic import parse_answer


def score(completions: list[str], problems: pl.DataFrame, reward_fn: Callable) -> tuple[dict[str, float], pl.DataFrame]:
    """Metrics and a per-problem table for completions of `problems` (same order)."""
    predictions = [parse_answer(c) for c in completions]
    y = problems["y"].to_numpy()
    parsed = np.array([p is not None for p in predictions])
    pred = np.array([p if p is not None else 0 for p in predictions])
    correct = parsed & (pred == y)
    odd = problems["parity"].to_numpy() == "odd"
    rewards = np.asarray(reward_fn(completions, y.tolist()), dtype=float)

    def mean(values: np.ndarray) -> float:
        return float(values.mean()) if values.size else float("nan")

    metrics = {
        "accuracy": mean(correct),
        "accuracy_odd": mean(correct[odd]),
        "accuracy_even": mean(correct[~odd]),
        "mae": mean(np.abs(pred - y)[parsed]),
        "parse_rate": mean(parsed),
        "even_prediction_rate": mean((pred % 2 == 0)[parsed]),
        "reward": mean(rewards),
        "n": int(len(y)),
    }
    rows = problems.select("id", "prompt", "y", "parity").with_columns(
        completion=pl.Series(completions),
        prediction=pl.Series([p for p in predictions], dtype=pl.Int64),
        correct=pl.Series(correct),
        reward=pl.Series(rewards),
    )
    return metrics, rows


def evaluate_policy(
    policy: LMPolicy,
    problems: pl.DataFrame,
    reward_fn: Callable,
    batch_size: int,
    max_new_tokens: int,
    desc: str = "evaluate",
) -> tuple[dict[str, float], pl.DataFrame]:
    """Greedy-decode every problem in batches and `score` the completions."""
    prompts = problems["prompt"].to_list()
    completions: list[str] = []
    for start in progress(range(0, len(prompts), batch_size), desc, unit="batch"):
        completions += policy.generate(prompts[start : start + batch_size], max_new_tokens)
    return score(completions, problems, reward_fn)


def heldout_monitor(policy: LMPolicy, problems: pl.DataFrame, reward_fn: Callable, max_new_tokens: int):
    """A callable for training loops: greedy accuracy (overall / odd / even) on a fixed held-out batch."""

    def monitor() -> dict[str, float]:
        # eval mode for greedy decoding; a trainer switches modes itself at the start of every step
        # (reading `policy.model.training` back would be wrong for a policy whose model is frozen)
        policy.train(False)
        metrics, _ = score(policy.generate(problems["prompt"].to_list(), max_new_tokens), problems, reward_fn)
        return {f"heldout_{k}": metrics[k] for k in ("accuracy", "accuracy_odd", "accuracy_even")}

    return monitor
