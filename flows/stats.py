"""Statistics over seeds: mean, sample standard deviation and a 95% Student t-interval.

Seeds are few (3-10), so the interval uses Student's t with n - 1 degrees of freedom, not the normal
1.96: mean ± t_{0.975, n-1} · s / √n, s the sample standard deviation (divisor n - 1). It assumes the
per-seed results are independent draws from a roughly normal distribution; with n = 1 there is no
interval. scipy is not a dependency, so the t quantile is computed here from the closed-form CDF.
"""

import math


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


def summarize(values: list[float], level: float = 0.95) -> dict[str, float | int | None]:
    """n, mean, sample std and the two-sided `level` t-interval [low, high] of `values` (None where undefined)."""
    n = len(values)
    if n == 0:
        raise ValueError("no values to summarize")
    mean = sum(values) / n
    if n == 1:
        return {"n": 1, "mean": mean, "std": None, "low": None, "high": None}
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = t_quantile((1 + level) / 2, n - 1) * std / math.sqrt(n)
    return {"n": n, "mean": mean, "std": std, "low": mean - half, "high": mean + half}
