"""Statistics over seeds: mean, sample standard deviation and a 95% interval that stays in the metric's range.

The interval of every sweep row is the **expanded percentile bootstrap** of the mean over seeds (`bootstrap_interval`):
the percentile interval of the bootstrap distribution of the mean (Efron & Tibshirani 1993, *An Introduction to the
Bootstrap*, ch. 13), its tail probability widened for few seeds as Hesterberg proposes (2015, "What Teachers Should
Know About the Bootstrap", *The American Statistician* 69(4), sec. 5): the plain percentile interval is too narrow
for small n (the bootstrap's spread is the plug-in s·√((n−1)/n)/√n, and it uses the normal quantile where Student's
t is due), so each tail gets the probability α' with Φ⁻¹(1 − α') = √(n/(n−1)) · t_{1−α/2, n−1}. For 5 seeds at 95%
that is α' ≈ 0.001 a side, and the interval is about as wide as Student's t-interval, but it is a percentile of
resampled means, so it never leaves [min, max] of the seeds' values: a proportion's interval stays within [0, 1],
a difference of proportions within [−1, 1]. A paired difference (two arms of one experiment, the same seed) is
bootstrapped as its per-seed differences, so the pairing is kept.

The bootstrap distribution is exact (every multiset of n draws, with its multinomial probability: Efron & Tibshirani's
"ideal" bootstrap, B → ∞) while that takes at most EXACT_LIMIT multisets (n <= 8); beyond, it is EXACT_LIMIT
resamples drawn from a fixed seed. Either way the same values give the same interval.

Student's t-interval (`t_interval`: mean ± t_{0.975, n−1} · s / √n, s with divisor n − 1, under independent,
roughly normal per-seed results) is kept for reference and for claims swept before the bootstrap existed; it can
pass a metric's bounds (0.752 [0.335, 1.168] for an accuracy over 3 seeds). With n = 1 there is no interval.
scipy is not a dependency, so the t quantile is computed here from the closed-form CDF.
"""

import math
import random
from collections.abc import Iterator

EXACT_LIMIT = 10_000  # multisets enumerated exactly (C(2n-1, n): 6435 for n = 8, 24310 for n = 9), or resamples drawn
BOOTSTRAP_SEED = 0  # the resampling stream's seed when the distribution is drawn, not enumerated


def t_two_sided_probability(t: float, df: int) -> float:
    """P(|T| <= t) for Student's t with integer `df` >= 1 degrees of freedom.

    Abramowitz & Stegun 26.7.3 (df odd) and 26.7.4 (df even), with θ = atan(t / √df):
      odd:  A = 2/π · (θ + sin θ · (cos θ + 2/3 cos³θ + ... + (2·4···(df-3))/(1·3···(df-2)) cos^(df-2) θ)), df=1: 2θ/π
      even: A = sin θ · (1 + 1/2 cos²θ + (1·3)/(2·4) cos⁴θ + ... + (1·3···(df-3))/(2·4···(df-2)) cos^(df-2) θ)
    """
    if df < 1:
        raise ValueError(f"degrees of freedom must be >= 1, got {df}")
    theta = math.atan(abs(t) / math.sqrt(df))
    cos2 = math.cos(theta) ** 2
    if df % 2:  # odd
        term = series = math.cos(theta) if df > 1 else 0.0
        for k in range(1, (df - 3) // 2 + 1):
            term *= cos2 * (2 * k) / (2 * k + 1)
            series += term
        return 2 / math.pi * (theta + math.sin(theta) * series)
    term = series = 1.0
    for k in range(1, (df - 2) // 2 + 1):
        term *= cos2 * (2 * k - 1) / (2 * k)
        series += term
    return math.sin(theta) * series


def t_quantile(p: float, df: int) -> float:
    """The t with P(T <= t) = p (p in (0.5, 1)), by bisection on the two-sided probability 2p - 1."""
    if not 0.5 < p < 1:
        raise ValueError(f"p must be in (0.5, 1), got {p}")
    target, low, high = 2 * p - 1, 0.0, 1.0
    while t_two_sided_probability(high, df) < target:
        high *= 2
    for _ in range(100):  # the interval halves each time: far below float precision
        middle = (low + high) / 2
        low, high = (middle, high) if t_two_sided_probability(middle, df) < target else (low, middle)
    return (low + high) / 2


def normal_cdf(z: float) -> float:
    """Φ(z), the standard normal CDF."""
    return 0.5 * (1 + math.erf(z / math.sqrt(2)))


def expanded_tail(n: int, level: float = 0.95) -> float:
    """Hesterberg's (2015) tail probability α' of each side of the expanded percentile interval for n values:
    1 − Φ(√(n/(n−1)) · t_{(1+level)/2, n−1}); n >= 2."""
    if n < 2:
        raise ValueError(f"an interval needs at least 2 values, got {n}")
    return 1 - normal_cdf(math.sqrt(n / (n - 1)) * t_quantile((1 + level) / 2, n - 1))


def _compositions(total: int, parts: int) -> Iterator[tuple[int, ...]]:
    """Every tuple of `parts` counts >= 0 that sum to `total` (each multiset of `total` draws from `parts` values)."""
    if parts == 1:
        yield (total,)
        return
    for first in range(total, -1, -1):
        for rest in _compositions(total - first, parts - 1):
            yield (first, *rest)


def bootstrap_means(values: list[float], seed: int = BOOTSTRAP_SEED) -> list[tuple[float, float]]:
    """The bootstrap distribution of the mean of `values` as (mean, probability) pairs, sorted by mean: exact
    (each multiset of n draws with probability n! / (Π c_i! · n^n)) while there are at most EXACT_LIMIT multisets,
    else EXACT_LIMIT resamples from random.Random(seed), each of probability 1 / EXACT_LIMIT."""
    n = len(values)
    if math.comb(2 * n - 1, n) <= EXACT_LIMIT:
        scale = math.factorial(n) / n**n
        pairs = [
            (
                sum(c * v for c, v in zip(counts, values, strict=True)) / n,
                scale / math.prod(math.factorial(c) for c in counts),
            )
            for counts in _compositions(n, n)
        ]
    else:
        draw = random.Random(seed)
        pairs = [(sum(draw.choices(values, k=n)) / n, 1 / EXACT_LIMIT) for _ in range(EXACT_LIMIT)]
    return sorted(pairs)


def bootstrap_interval(values: list[float], level: float = 0.95, seed: int = BOOTSTRAP_SEED) -> tuple[float, float]:
    """The expanded percentile bootstrap interval of the mean (module docstring): low is the smallest resampled mean
    with P(mean* <= low) >= α', high the largest with P(mean* >= high) >= α'. Both are means of the values, so the
    interval lies within [min(values), max(values)]. Needs n >= 2."""
    tail = expanded_tail(len(values), level)
    pairs = bootstrap_means(values, seed)
    below = 0.0
    for mean, probability in pairs:
        below += probability
        if below >= tail * (1 - 1e-12):  # the float sum of the probabilities must not miss an exact tail
            low = mean
            break
    above = 0.0
    for mean, probability in reversed(pairs):
        above += probability
        if above >= tail * (1 - 1e-12):
            high = mean
            break
    return low, high


def t_interval(values: list[float], level: float = 0.95) -> tuple[float, float]:
    """Student's t-interval mean ± t_{(1+level)/2, n−1} · s / √n (n >= 2): for reference, unbounded."""
    n, mean = len(values), sum(values) / len(values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = t_quantile((1 + level) / 2, n - 1) * std / math.sqrt(n)
    return mean - half, mean + half


def summarize(values: list[float], level: float = 0.95) -> dict:
    """n, mean, sample std, the two-sided `level` bootstrap interval [low, high] of the mean (None where undefined)
    and the values themselves (so a verdict or another interval can be computed again from the stored row)."""
    n = len(values)
    if n == 0:
        raise ValueError("no values to summarize")
    mean = sum(values) / n
    if n == 1:
        return {"n": 1, "mean": mean, "std": None, "low": None, "high": None, "values": list(values)}
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    low, high = bootstrap_interval(values, level)
    return {"n": n, "mean": mean, "std": std, "low": low, "high": high, "values": list(values)}
