"""Reward functions are plain callables: `reward(completions, targets) -> list[float]`."""

from dataclasses import dataclass

from latentlab.tasks.arithmetic import parse_answer


@dataclass(frozen=True)
class ArithmeticReward:
    """r = 1 / (1 + |y_hat - y|)  +  even_bonus * [y_hat is even];  r = 0 when no integer is found.

    Closeness gives partial credit (an off-by-one answer earns 1/2), so a biased model still gets
    a learning signal on problems it gets wrong; the bonus pays for trying even answers at all,
    which a model fine-tuned on odd answers only has stopped producing.
    """

    even_bonus: float = 0.0

    def __call__(self, completions: list[str], targets: list[int]) -> list[float]:
        rewards = []
        for completion, y in zip(completions, targets, strict=True):
            y_hat = parse_answer(completion)
            if y_hat is None:
                rewards.append(0.0)
            else:
                rewards.append(1.0 / (1.0 + abs(y_hat - y)) + self.even_bonus * (y_hat % 2 == 0))
        return rewards
