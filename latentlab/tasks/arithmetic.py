"""The arithmetic task: problems, the three splits, prompt/answer text and answer parsing.

A problem is `a op b = y`. The prompt is "a op b=" and the answer is the decimal text of y.
The biased training set keeps odd y only (optionally mixing a share of even y back in), the full
set keeps both parities, and the held-out test set has as many odd as even answers and shares no
(a, op, b) with either training set.
"""

import operator
import re
from typing import Literal

import numpy as np
import polars as pl
from pydantic import Field, model_validator

from latentlab.common.batches import epoch_batches
from latentlab.common.config import Config

OPERATORS = {"+": operator.add, "-": operator.sub, "*": operator.mul}
PROBLEM_SCHEMA = {
    "id": pl.Int64,
    "prompt": pl.String,
    "answer": pl.String,
    "y": pl.Int64,
    "parity": pl.String,
    "a": pl.Int64,
    "b": pl.Int64,
    "op": pl.String,
}
_LEADING_INT = re.compile(r"\s*(-?\d+)")
_THINKING = re.compile(r"\s*<think>(.*?)(</think>|$)", re.DOTALL)  # a thinking model's reasoning (Qwen3)


class ArithmeticConfig(Config):
    operand_min: int = Field(0, ge=0)
    """Smallest operand."""
    operand_max: int = Field(49, ge=0)
    """Largest operand (inclusive)."""
    ops: list[Literal["+", "-", "*"]] = Field(default_factory=lambda: ["+", "-"], min_length=1)
    """Operators to draw from."""
    n_test: int = Field(400, ge=2)
    """Held-out problems, half with odd and half with even answers."""
    n_train: int | None = Field(None, ge=1)
    """Size of the full training set (null: every problem not held out)."""
    even_data_ratio: float = Field(0.0, ge=0.0, lt=1.0)
    """Share of even answers mixed back into the biased set (0: odd only)."""

    @model_validator(mode="after")
    def _operands_ordered(self):
        if self.operand_max < self.operand_min:
            raise ValueError(f"operand_max ({self.operand_max}) is below operand_min ({self.operand_min})")
        if len(set(self.ops)) != len(self.ops):
            raise ValueError(f"ops has repeated operators: {self.ops}")
        return self


def prompt_text(a: int, op: str, b: int) -> str:
    return f"{a}{op}{b}="


def parse_answer(completion: str) -> int | None:
    """The integer a completion starts with, or None: '19', ' 19\\n3+4=7' -> 19; 'x' -> None. A thinking model's
    leading <think>...</think> block is read past: '<think>\\n\\n</think>\\n\\n19' -> 19; a block never closed
    (the reasoning ran out of tokens) holds no answer -> None."""
    thinking = _THINKING.match(completion)
    if thinking:
        if not thinking.group(2):
            return None
        completion = completion[thinking.end() :]
    match = _LEADING_INT.match(completion)
    return int(match.group(1)) if match else None


def all_problems(cfg: ArithmeticConfig) -> pl.DataFrame:
    """Every (a, op, b) of the configured ranges, in a fixed canonical order; `id` is the row index."""
    operands = np.arange(cfg.operand_min, cfg.operand_max + 1)
    rows = [(a, op, b) for op in cfg.ops for a in operands.tolist() for b in operands.tolist()]
    a, ops, b = zip(*rows)
    y = [OPERATORS[o](x, z) for x, o, z in rows]
    return pl.DataFrame(
        {
            "id": range(len(rows)),
            "prompt": [prompt_text(*row) for row in rows],
            "answer": [str(v) for v in y],
            "y": y,
            "parity": ["even" if v % 2 == 0 else "odd" for v in y],
            "a": a,
            "b": b,
            "op": ops,
        },
        schema=PROBLEM_SCHEMA,
    )


def make_splits(cfg: ArithmeticConfig, seed: int) -> dict[str, pl.DataFrame]:
    """The `test`, `full` and `biased` sets, deterministic in (cfg, seed)."""
    problems = all_problems(cfg)
    rng = np.random.default_rng(seed)
    shuffled = problems[rng.permutation(problems.height)]
    half = cfg.n_test // 2
    by_parity = {p: shuffled.filter(pl.col("parity") == p) for p in ("odd", "even")}
    for parity, rows in by_parity.items():
        if rows.height < half:
            raise ValueError(
                f"synth.n_test={cfg.n_test} needs {half} {parity} problems, the ranges give only {rows.height}"
            )
    test = pl.concat([by_parity["odd"][:half], by_parity["even"][:half]])
    test = test[rng.permutation(test.height)]
    rest = shuffled.join(test.select("id"), on="id", how="anti")
    full = rest if cfg.n_train is None else rest[: cfg.n_train]
    if full.height == 0:
        raise ValueError("no training problems left after holding out the test set: widen the operand range")

    odd = full.filter(pl.col("parity") == "odd")
    even = full.filter(pl.col("parity") == "even")
    # ratio = n_even / (n_odd + n_even)  =>  n_even = ratio / (1 - ratio) * n_odd
    n_even = min(even.height, round(cfg.even_data_ratio / (1 - cfg.even_data_ratio) * odd.height))
    biased = pl.concat([odd, even[:n_even]])
    biased = biased[rng.permutation(biased.height)]
    return {"test": test, "full": full, "biased": biased}


def pretraining_corpus(
    problems: pl.DataFrame,
    n_sequences: int,
    seq_chars: int,
    seed: int,
    other_lines: list[str] | None = None,
    other_share: float = 0.0,
) -> list[str]:
    """Text made of equations 'a op b=y' one per line, drawn from `problems`, packed to `seq_chars`.

    The base model learns digits and arithmetic of both parities from it, but never sees an
    end-of-sequence after an answer: stopping is what SFT teaches, odd answers only.
    With `other_share` > 0, that share of the sequences (rounded) is packed the same way from
    `other_lines` instead (e.g. the grid world's observation texts), drawn from a separate stream,
    so the equations part is the same as without them for the same number of equation sequences.
    """
    n_other = round(other_share * n_sequences) if other_lines else 0
    lines = [f"{p}{y}\n" for p, y in zip(problems["prompt"], problems["answer"])]
    corpus = _packed(lines, n_sequences - n_other, seq_chars, np.random.default_rng(seed))
    if n_other:
        other = [f"{line}\n" for line in other_lines]
        corpus += _packed(other, n_other, seq_chars, np.random.default_rng([seed, 1]))
    return corpus


def _packed(lines: list[str], n_sequences: int, seq_chars: int, rng: np.random.Generator) -> list[str]:
    """`n_sequences` texts of `seq_chars` characters, each lines drawn at random and concatenated."""
    corpus = []
    for _ in range(n_sequences):
        text = ""
        while len(text) < seq_chars:
            text += lines[rng.integers(len(lines))]
        corpus.append(text[:seq_chars])
    return corpus


def problem_batches(problems: pl.DataFrame, batch_size: int, generator):
    """Endless (prompts, y) batches of `problems`, reshuffled each epoch by a torch generator."""
    prompts, ys = problems["prompt"].to_list(), problems["y"].to_list()
    for rows in epoch_batches(len(prompts), batch_size, generator):
        yield [prompts[i] for i in rows], [ys[i] for i in rows]
