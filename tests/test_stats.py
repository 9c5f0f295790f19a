"""The bootstrap interval over seeds, by hand: its distribution, its tails, its range, and that it can fail."""

import math

import pytest

from flows import stats
from flows.stats import bootstrap_interval, bootstrap_means, expanded_tail, summarize, t_interval


def test_the_exact_bootstrap_of_two_values_by_hand():
    # draws of 2 from {1, 3}: (1,1) p 1/4 -> 1, (1,3)/(3,1) p 1/2 -> 2, (3,3) p 1/4 -> 3
    assert bootstrap_means([1.0, 3.0]) == [(1.0, 0.25), (2.0, 0.5), (3.0, 0.25)]
    # 126 multisets of 5 draws from 5 values, probabilities summing to 1, the mean of the means the sample mean
    pairs = bootstrap_means([0.1, 0.2, 0.3, 0.4, 0.5])
    assert len(pairs) == math.comb(9, 5) and sum(p for _, p in pairs) == pytest.approx(1)
    assert sum(m * p for m, p in pairs) == pytest.approx(0.3)


def test_the_expanded_tail_by_hand():
    # n = 5: sqrt(5/4) * t(0.975, 4) = 1.1180 * 2.7764 = 3.1041; 1 - Phi(3.1041) = 0.000954
    assert expanded_tail(5) == pytest.approx(0.000954, abs=2e-6)
    # n large: sqrt(n/(n-1)) t -> 1.96, the plain percentile interval's 2.5% a side
    assert expanded_tail(10_000) == pytest.approx(0.025, abs=2e-4)


def test_five_seeds_by_hand():
    # sorted x1..x5 distinct: P(mean* = x1) = 5^-5 = 0.00032 < 0.000954 <= P(mean* <= (4 x1 + x2)/5) = 6 / 5^5, so
    # low = (4 x1 + x2)/5 and high = (4 x5 + x4)/5: here (0.4 + 0.2)/5 = 0.12 and (2.0 + 0.4)/5 = 0.48
    assert bootstrap_interval([0.3, 0.1, 0.5, 0.2, 0.4]) == pytest.approx((0.12, 0.48))
    # about as wide as Student's t (0.3 -+ 0.196), never wider than the values' range
    assert t_interval([0.1, 0.2, 0.3, 0.4, 0.5]) == pytest.approx((0.1037, 0.4963), abs=1e-4)


def test_a_proportion_interval_stays_in_its_range_where_t_leaves_it():
    accuracies = [1.0, 1.0, 1.0, 0.9, 0.95]
    low, high = bootstrap_interval(accuracies)
    assert 0.9 <= low < high <= 1.0 and high == 1.0
    assert t_interval(accuracies)[1] > 1  # Student's t passes 1
    # the base even accuracy over 3 seeds: t gave [0.335, 1.168]; the bootstrap stays within the values
    low, high = bootstrap_interval([0.45, 0.9, 0.906])
    assert 0.45 <= low and high <= 0.906


def test_a_paired_difference_is_the_bootstrap_of_its_per_seed_differences():
    a, b = [0.5, 0.6, 0.7, 0.8, 0.9], [0.4, 0.5, 0.6, 0.7, 0.85]  # a - b: 0.1 every seed but the last, 0.05
    low, high = bootstrap_interval([x - y for x, y in zip(a, b, strict=True)])
    assert (low, high) == pytest.approx((0.05 * 4 / 5 + 0.1 / 5, 0.1))
    # the arms' own intervals overlap widely; the pairing resolves the difference
    assert bootstrap_interval(a)[0] < bootstrap_interval(b)[1]


def test_mirror_images_and_constants():
    values = [0.2, -0.1, 0.4, 0.05, 0.3, 0.0]
    low, high = bootstrap_interval(values)
    assert bootstrap_interval([-v for v in values]) == pytest.approx((-high, -low))
    assert bootstrap_interval([0.25] * 5) == (0.25, 0.25)


def test_many_seeds_are_drawn_from_a_fixed_seed(monkeypatch):
    values = [0.3, 0.05, 0.9, 0.41, 0.62, 0.2, 0.77, 0.13, 0.5]  # C(17, 9) = 24310 multisets: resampled
    first = bootstrap_interval(values)
    assert bootstrap_interval(values) == first  # deterministic
    assert bootstrap_means(values, seed=1) != bootstrap_means(values)  # and it is the seed that fixes it
    t_low, t_high = t_interval(values)
    assert abs(first[0] - t_low) < 0.06 and abs(first[1] - t_high) < 0.06
    # the drawn distribution agrees with the exact one, enumerated once the limit allows it
    monkeypatch.setattr(stats, "EXACT_LIMIT", 30_000)
    assert len(bootstrap_means(values)) == 24310
    assert first == pytest.approx(bootstrap_interval(values), abs=0.03)


def test_the_interval_check_can_fail():
    """A mutation: a bootstrap at the plain 2.5% tails (no expansion) is narrower than the hand bound for 5 seeds;
    a t-interval is not within the range: the tests above would catch either."""
    pairs = bootstrap_means([0.1, 0.2, 0.3, 0.4, 0.5])
    plain_low = next(m for m, cumulative in _cumulative(pairs) if cumulative >= 0.025)
    assert plain_low > 0.12 + 1e-9
    assert t_interval([1.0, 1.0, 1.0, 0.9, 0.95])[1] > 1.0


def _cumulative(pairs):
    total = 0.0
    for mean, probability in pairs:
        total += probability
        yield mean, total


def test_summary_rows_keep_their_values():
    row = summarize([0.1, 0.2, 0.3, 0.4, 0.5])
    assert row["values"] == [0.1, 0.2, 0.3, 0.4, 0.5] and (row["low"], row["high"]) == pytest.approx((0.12, 0.48))
    assert summarize([0.25]) == {"n": 1, "mean": 0.25, "std": None, "low": None, "high": None, "values": [0.25]}
