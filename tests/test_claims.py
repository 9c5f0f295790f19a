"""Verdict rules of the claims, by hand: holds, refuted, undecided, too few seeds; stored when written, shown beside
each claim in the report, and 'no verdict' for entries swept before rules existed."""

import json
from pathlib import Path

import pytest
from ruamel.yaml import YAML

from flows.claims import CLAIMS, MIN_SEEDS, difference_name, update_claims, verdict, verdict_lines
from flows.stats import summarize

SCRATCH = YAML(typ="safe").load((Path(__file__).parents[1] / "params.yaml").read_text())["model"]
GAIN = difference_name("grpo.accuracy_even", "sft.accuracy_even")


def _row(values, config=None, metric=GAIN):
    return {
        "config": config or {},
        "metric": metric,
        **summarize(values),
        "seeds": list(range(len(values))),
        "experiments": ["e"],
    }


@pytest.mark.parametrize(
    ("values", "expected", "bound"),
    [
        # 5 seeds: the interval is [(4 x1 + x2)/5, (4 x5 + x4)/5] (tests/test_stats.py)
        ([0.30, 0.32, 0.34, 0.36, 0.38], "holds", 0.304),  # [0.304, 0.376], all >= 0.10
        ([0.10, 0.12, 0.14, 0.16, 0.18], "holds", 0.104),  # low 0.104 >= 0.10: just
        ([0.09, 0.12, 0.14, 0.16, 0.18], "undecided", 0.096),  # low 0.096 < 0.10 < high
        ([0.00, 0.02, 0.04, 0.06, 0.08], "refuted", 0.004),  # high 0.076 < 0.10: a gain too small to matter
        ([-0.3, -0.2, -0.25, -0.1, -0.15], "refuted", -0.29),  # the other sign: (4 (-0.3) - 0.25)/5
        ([0.5, 0.6, 0.7, 0.8], "too few seeds", None),  # 4 < 5 seeds: no verdict, whatever the interval
    ],
)
def test_an_at_least_rule_by_hand(values, expected, bound):
    rule = CLAIMS["even_recovery"]["rule"]
    assert rule["metric"] == GAIN and rule["at_least"] == 0.10
    got = verdict(rule, _row(values))
    assert got["verdict"] == expected
    assert got["bound"] == (None if bound is None else pytest.approx(bound))


def test_an_at_most_rule_mirrors_it():
    rule = {"metric": GAIN, "at_most": -0.10, "why": "w"}
    assert verdict(rule, _row([-0.30, -0.32, -0.34, -0.36, -0.38]))["verdict"] == "holds"
    assert verdict(rule, _row([0.0, 0.02, 0.04, 0.06, 0.08]))["verdict"] == "refuted"
    undecided = verdict(rule, _row([-0.2, -0.15, -0.1, -0.05, 0.0]))
    assert undecided["verdict"] == "undecided" and undecided["bound"] == pytest.approx((4 * 0.0 - 0.05) / 5)


def test_the_rule_check_can_fail():
    """A mutation: the issue's 3-seed t-interval rows would 'hold' under a rule that ignored the seed count."""
    row = _row([0.3, 0.5, 0.9])
    assert row["low"] >= 0.10 and verdict(CLAIMS["even_recovery"]["rule"], row)["verdict"] == "too few seeds"
    assert MIN_SEEDS == 5


def test_every_claim_has_a_rule_on_one_of_its_metrics():
    for claim_id, claim in CLAIMS.items():
        rule = claim["rule"]
        assert rule["metric"] in claim["metrics"], claim_id
        assert ("at_least" in rule) != ("at_most" in rule) and rule["why"], claim_id


def test_verdicts_are_stored_when_claims_are_written_and_shown_in_the_report(tmp_path, monkeypatch):
    from stages import report

    rows = [
        _row([0.30, 0.32, 0.34, 0.36, 0.38], {"grpo.even_bonus": "0.1"}),
        _row([0.00, 0.15, 0.20, 0.25, 0.30], {"grpo.even_bonus": "0"}),
        _row([0.5] * 5, {"grpo.even_bonus": "0.1"}, "grpo.accuracy_even"),
    ]
    sweep = {"command": "c", "baseline": "abcdef0", "keys": ["grpo.even_bonus"], "seeds": [0, 1, 2, 3, 4]}
    sweep |= {"targets": [], "interval": "bootstrap", "counts": {"total": 10, "failed": 0}, "unit": "seed"}
    path = tmp_path / "claims.json"
    claims = update_claims(path, ["even_recovery"], {**sweep, "stage_seeds": None, "rows": rows}, SCRATCH)
    stored = json.loads(path.read_text())["claims"]["even_recovery"]
    assert stored == claims["claims"]["even_recovery"]
    assert [(v["config"], v["verdict"]) for v in stored["verdicts"]] == [
        ({"grpo.even_bonus": "0.1"}, "holds"),
        ({"grpo.even_bonus": "0"}, "undecided"),
    ]
    assert stored["rule"] == CLAIMS["even_recovery"]["rule"] and stored["sweep"]["unit"] == "seed"
    text = report.claims_section(claims, SCRATCH)
    title = f"### {CLAIMS['even_recovery']['title']}"
    assert text.startswith(title) and text.index("- Rule: holds if") < text.index("| configuration |")
    assert (
        "- grpo.even_bonus=0.1: **holds**: mean +0.340, [+0.304, +0.376], n 5; it excludes effects below +0.304."
        in text
    )


def test_an_entry_swept_before_rules_existed_still_renders_without_a_verdict():
    """The committed results/claims.json (3 seeds, t-intervals, no values): every claim says why it has no verdict."""
    from stages import report

    root = Path(__file__).parents[1]
    claims = json.loads((root / "results/claims.json").read_text())
    for claim_id, entry in claims["claims"].items():
        if "verdicts" not in entry:
            lines = verdict_lines(claim_id, entry)
            assert lines[0].startswith("- Rule: ") and "No verdict: swept before the rule existed" in lines[1]
    text = report.claims_section(claims, SCRATCH)
    assert "No verdict: swept before the rule existed (3 seeds per arm" in text
