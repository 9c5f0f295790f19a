"""Scoring NLA actors on held-out activations: critic(actor(v)) against v, with controls and a ceiling.

For each actor, greedy explanations of every held-out vector v_i, read back by the critic. Targets
t = (v - mu) / sigma on the critic's fixed scale (mu: the training mean; sigma: ONE scalar, the RMS
norm of the centred training vectors, so mean ||t||^2 = 1 on the training set; policies/nla_critic.py),
t_hat = critic(actor(v)) unnormalised:
    fve     1 - sum_i ||t_i - t_hat_i||^2 / sum_i ||t_i - mean(t)||^2, mean(t) the held-out vectors' own
            mean: a perfect critic 1, predicting that mean 0, worse below 0. sigma cancels and mu drops
            out, so this equals 1 - sum ||v - v_hat||^2 / sum ||v - mean(v)||^2 with v_hat = mu + sigma t_hat
    cosine  mean_i cos(t_hat_i, t_i)                  (its own metric: the direction alone)
    mse     mean_i ||t_i - t_hat_i||^2                (on t's scale; `mean_predictor_mse` is FVE's
                                                       denominator, ~1 for held-out vectors like the training ones)
An empty explanation from an actor is scored as the mean predictor (t_hat = 0: FVE 0 on its rows).
Controls, with the same critic:
    shuffled   the actor reads another row's vector (a fixed permutation): what is left is what any
               explanation of this task would give (near or below 0); the claim is the drop from `actor` to this
    gold       the critic on the text the vector was computed from: the ceiling of this critic
    empty      the critic reads an empty explanation: one constant prediction for every row, so FVE <= 0
               (0 only if that constant is the held-out mean)
Can the answer be read from the explanation? The answer of the first equation the explanation
writes (`a op b=y`) against the true answer of the problem, beside a linear probe on the same vectors:
closed-form ridge regression onto one-hot answers, fit on the training vectors, argmax.
"""

import re
from dataclasses import dataclass

import numpy as np
import torch

from latentlab.common.tracking import progress
from latentlab.policies.nla_actor import NLAActor
from latentlab.policies.nla_critic import NLACritic, fraction_of_variance_explained, mean_predictor_mse, reconstruct
from latentlab.tasks.arithmetic import OPERATORS

_EQUATION = re.compile(r"\s*(-?\d+)\s*([+\-*])\s*(-?\d+)\s*=\s*(-?\d+)")


def problem_answer(prompt: str) -> int:
    """The true answer of a problem prompt `a op b=`."""
    a, op, b = re.fullmatch(r"(-?\d+)([+\-*])(-?\d+)=", prompt).groups()
    return OPERATORS[op](int(a), int(b))


def stated_answer(explanation: str) -> int | None:
    """The y of the first `a op b=y` the explanation writes, or None."""
    match = _EQUATION.match(explanation)
    return int(match.group(4)) if match else None


def explain(actor: NLAActor, vectors: np.ndarray, max_new_tokens: int, batch: int, desc: str) -> list[str]:
    actor.train(False)
    texts: list[str] = []
    for lo in progress(range(0, len(vectors), batch), desc, unit="batch"):
        texts += actor.generate(list(vectors[lo : lo + batch]), max_new_tokens)
    return texts


def reconstruction_scores(critic: NLACritic, texts: list[str], vectors: np.ndarray, read_empty: bool = False) -> dict:
    """FVE, mean cosine and MSE of the critic reading `texts` (row i explains `vectors[i]`), over these rows."""
    scores = reconstruct(critic, texts, vectors, read_empty=read_empty)
    return {
        "fve": fraction_of_variance_explained(scores.mse, critic.target(vectors)),
        "cosine": scores.cosine.mean().item(),
        "mse": scores.mse.mean().item(),
    }


def ridge_probe_accuracy(
    train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray, l2: float = 1e-2
) -> float:
    """Exact match of a linear probe: W = (X'X + l2 I)^-1 X'Y on one-hot answers (with a bias column), argmax."""
    classes = np.unique(train_y)
    onehot = (train_y[:, None] == classes[None]).astype(np.float64)

    def design(x):
        return np.hstack([x.astype(np.float64), np.ones((len(x), 1))])

    x = design(train_x)
    weights = np.linalg.solve(x.T @ x + l2 * np.eye(x.shape[1]), x.T @ onehot)
    predictions = classes[(design(test_x) @ weights).argmax(1)]
    return float((predictions == test_y).mean())


def answer_accuracy(texts: list[str], answers: np.ndarray) -> dict:
    stated = [stated_answer(t) for t in texts]
    return {
        "answer_exact_match": float(np.mean([s is not None and s == y for s, y in zip(stated, answers)])),
        "parse_rate": float(np.mean([s is not None for s in stated])),
    }


@dataclass(frozen=True, kw_only=True)
class NLAEvaluation:
    """What `evaluate_nla` scores explanations on, and how."""

    vectors: np.ndarray
    """`(N, d)` held-out activation vectors."""
    gold_texts: list[str]
    """Their gold explanations (the labelled responses)."""
    prompts: list[str]
    """The problems they were read from (the answer each explanation should state)."""
    train_vectors: np.ndarray
    """The training vectors the linear-probe baseline learns from..."""
    train_prompts: list[str]
    """...and their problems."""
    max_new_tokens: int
    """Longest explanation."""
    batch: int
    """Vectors per generation batch."""
    seed: int
    """Seeds the shuffled-vector control's permutation."""
    examples: int = 5
    """Explanations quoted in the metrics."""


def evaluate_nla(actors: dict[str, NLAActor], critic: NLACritic, evaluation: NLAEvaluation) -> dict:
    """The metrics block of metrics/nla.json: per actor (and its shuffled control), gold, empty, probe."""
    e = evaluation
    vectors, gold_texts, prompts, max_new_tokens, batch, examples = (
        e.vectors, e.gold_texts, e.prompts, e.max_new_tokens, e.batch, e.examples
    )  # fmt: skip
    answers = np.array([problem_answer(p) for p in prompts])
    permutation = np.random.default_rng(e.seed).permutation(len(vectors))
    result = {
        "n": len(vectors),
        "target_scale": critic.scale.item(),  # sigma: t = (v - mu) / sigma
        "mean_predictor_mse": mean_predictor_mse(critic, vectors),  # FVE's denominator per row
        "actors": {},
    }
    for name, actor in actors.items():
        texts = explain(actor, vectors, max_new_tokens, batch, f"nla {name}")
        shuffled_texts = explain(actor, vectors[permutation], max_new_tokens, batch, f"nla {name} shuffled")
        scores = reconstruction_scores(critic, texts, vectors)
        shuffled = reconstruction_scores(critic, shuffled_texts, vectors)
        mse = reconstruct(critic, texts[:examples], vectors[:examples]).mse
        result["actors"][name] = {
            **scores,
            **answer_accuracy(texts, answers),
            "explanation_chars": float(np.mean([len(t) for t in texts])),
            "shuffled": shuffled,
            "fve_drop_when_shuffled": scores["fve"] - shuffled["fve"],
            "examples": [
                {"gold": g, "explanation": t, "mse": m}
                for g, t, m in zip(gold_texts[:examples], texts[:examples], mse.tolist())
            ],
        }
    # the gold text's first equation is the problem and the base model's own answer
    gold = reconstruction_scores(critic, gold_texts, vectors)
    result["gold_text"] = {**gold, **answer_accuracy(gold_texts, answers)}
    result["empty_text"] = reconstruction_scores(critic, [""] * len(vectors), vectors, read_empty=True)
    with torch.no_grad():
        empty_cos = torch.nn.functional.cosine_similarity(
            critic.predict([""]).float(), critic.target(vectors).mean(0, keepdim=True)
        ).item()
    result["empty_text"]["critic_reads_empty_as_mean_cosine"] = empty_cos
    result["linear_probe_exact_match"] = ridge_probe_accuracy(
        e.train_vectors, np.array([problem_answer(p) for p in e.train_prompts]), vectors, answers
    )
    return result
