"""The report's Claims: which numbers of a sweep back which headline claim -> results/claims.json.

`python -m flows.sweep ... --claims even_recovery,inject_vs_grpo` (re)writes those claims' entries from
the sweep it just ran and keeps every other entry, so each stage adds its own claims the same way: add an
entry to CLAIMS (metrics named as in the sweep summary: `model.metric` of metrics/eval.json, or
`path:key` of another metrics file) and its `rule`, run its sweep with --claims, commit results/claims.json. The
report stage renders whatever the file holds; nobody types a number into it.

Every claim carries a verdict rule, written before its sweep runs: one metric (a paired per-seed difference where
there is one), the smallest effect that would matter (`at_least`: the claim says the metric is at least this;
`at_most`: at most this), and why that size. Against the 95% interval of each configuration (flows/stats.py):

- **holds**: the interval lies entirely on the claimed side of the threshold (low >= at_least / high <= at_most);
- **refuted**: it lies entirely on the other side (high < at_least / low > at_most): the effect, if any, is smaller
  than what matters, or of the other sign;
- **undecided**: otherwise (the interval straddles the threshold);
- **too few seeds**: fewer than MIN_SEEDS seeds in the row (the sweep refuses --claims below it, but a seed can fail).

Each verdict also states the smallest effect the interval excludes: for a claimed increase, effects below its low
end are excluded (its `bound`), for a claimed decrease those above its high end. The verdicts are stored with the
claim's entry (`verdicts`) when it is written; an entry written before rules existed has none, and the report says so.
"""

import json
from pathlib import Path

from latentlab.common.atomic import atomic_output

MIN_SEEDS = 5  # seeds per arm below which a verdict is "too few seeds" (and the sweep refuses --claims)

NLA = "metrics/nla.json:"  # evaluate_nla's scores: nla_sft.* (SFT actor and critic), nla_rl.* (after RL)
SFT_ACTOR, RL_ACTOR = f"{NLA}nla_sft.actors.nla_sft", f"{NLA}nla_rl.actors.nla_rl"
SURGERY = "metrics/surgery.json:"  # the surgery stage's three arms from one phase-1 state
GRID = "metrics/policy.json:"  # evaluate_grid's returns table
INJECT = "metrics/inject.json:"  # the inject stage: the frozen SFT model, the injector at step 0 and after GRPO

# Per-seed differences the sweep computes (paired: same seed, same configuration), named "a - b".
DIFFERENCES = [
    ("grpo.accuracy_even", "sft.accuracy_even"),
    ("inject.accuracy", "grpo.accuracy"),
    (f"{RL_ACTOR}.fve", f"{SFT_ACTOR}.fve"),
    (f"{INJECT}final.accuracy", f"{INJECT}sft.accuracy"),
]


def difference_name(a: str, b: str) -> str:
    return f"{a} - {b}"


# The injection table's columns: the frozen SFT model alone, the injected model before any training (and after the
# alignment phase), after GRPO (overall / odd / even answers), and what GRPO trains.
INJECTION_METRICS = [
    f"{INJECT}sft.accuracy",
    f"{INJECT}sft.accuracy_odd",
    f"{INJECT}sft.accuracy_even",
    f"{INJECT}step0.accuracy",
    f"{INJECT}after_align.accuracy",
    f"{INJECT}final.accuracy",
    f"{INJECT}final.accuracy_odd",
    f"{INJECT}final.accuracy_even",
    difference_name(f"{INJECT}final.accuracy", f"{INJECT}sft.accuracy"),
    f"{INJECT}trained_parameters",
]

# Written only by some configurations (inject.align_steps > 0): a default run lacks them by design.
CONDITIONAL_METRICS = {f"{INJECT}after_align.accuracy"}

# The injection claims ask the same question of each configuration: after GRPO, is the injected model still as good
# as the frozen SFT model it reads (the virtual token in distribution)? The shuffled control is judged alike.
INJECTION_RULE = {
    "metric": difference_name(f"{INJECT}final.accuracy", f"{INJECT}sft.accuracy"),
    "at_least": -0.02,
    "why": "a virtual token in distribution costs the frozen SFT model at most 2 points of accuracy (8 of 400 test "
    "problems), paired per seed",
}

CLAIMS = {
    "even_recovery": {
        "title": "GRPO with the even bonus recovers even answers that SFT on odd-only data lost",
        "rule": {
            "metric": difference_name("grpo.accuracy_even", "sft.accuracy_even"),
            "at_least": 0.10,
            "why": "a recovery is at least 10 points of even-answer accuracy over the SFT model GRPO starts from "
            "(20 of the 200 even test problems)",
        },
        "metrics": [
            "base.accuracy_even",
            "sft.accuracy_even",
            "grpo.accuracy_even",
            difference_name("grpo.accuracy_even", "sft.accuracy_even"),
            "sft.accuracy_odd",
            "grpo.accuracy_odd",
        ],
    },
    "inject_vs_grpo": {
        "title": "An injector on the frozen SFT model vs GRPO of the whole model (same reward, prompts, steps)",
        "rule": {
            "metric": difference_name("inject.accuracy", "grpo.accuracy"),
            "at_least": -0.05,
            "why": "the injector's case is parameter efficiency (about 2% of GRPO's trained parameters): it holds if the "
            "injector comes within 5 points of GRPO's accuracy on the same SFT model, paired per seed",
        },
        "metrics": [
            "grpo.accuracy",
            "inject.accuracy",
            difference_name("inject.accuracy", "grpo.accuracy"),
            "grpo.accuracy_even",
            "inject.accuracy_even",
            "grpo.trained_parameters",
            "inject.trained_parameters",
        ],
    },
    "nla": {
        "title": "NLA: RL raises the fraction of variance the actor/critic pair explains (held-out vectors)",
        "rule": {
            "metric": difference_name(f"{RL_ACTOR}.fve", f"{SFT_ACTOR}.fve"),
            "at_least": 0.05,
            "why": "RL must explain at least 5% more of the held-out vectors' variance than the SFT actor it starts "
            "from (paired per seed); less is within what another critic update moves",
        },
        "revision": 2,
        "revised": "issue 25: FVE = 1 - sum ||v - v_hat||^2 / sum ||v - mean||^2 with the critic's prediction on the "
        "targets' scale; a sweep before it stored about 2 cos - 1 (of unit vectors) under the name fve",
        "metrics": [
            f"{SFT_ACTOR}.fve",
            f"{RL_ACTOR}.fve",
            difference_name(f"{RL_ACTOR}.fve", f"{SFT_ACTOR}.fve"),
            f"{SFT_ACTOR}.cosine",
            f"{RL_ACTOR}.cosine",
            f"{SFT_ACTOR}.shuffled.fve",
            f"{RL_ACTOR}.shuffled.fve",
            f"{NLA}nla_sft.gold_text.fve",
            f"{NLA}nla_rl.gold_text.fve",
            f"{NLA}nla_rl.empty_text.fve",
            f"{RL_ACTOR}.answer_exact_match",
            f"{NLA}nla_rl.linear_probe_exact_match",
        ],
    },
    "surgery": {
        "title": "SAC attention surgery on top of GRPO vs GRPO alone and a random surgeon (test accuracy)",
        "rule": {
            "metric": f"{SURGERY}sac_minus_grpo_only",
            "at_least": 0.02,
            "why": "the surgeon only rescales attention heads by at most 10%, so 2 points of test accuracy over GRPO "
            "alone from the same phase-1 state (8 of 400 problems, paired) is an effect worth its machinery",
        },
        "metrics": [
            f"{SURGERY}sac.accuracy",
            f"{SURGERY}random.accuracy",
            f"{SURGERY}grpo_only.accuracy",
            f"{SURGERY}sac_minus_grpo_only",
            f"{SURGERY}sac_minus_random",
            f"{SURGERY}sac.commits",
        ],
    },
    "inject_variants": {
        "title": "Injection variants that keep the virtual token in distribution (issue 12): residual, gated, norm, token",
        "rule": INJECTION_RULE,
        "metrics": INJECTION_METRICS,
    },
    "inject_align": {
        "title": "Injection with an alignment phase before GRPO (KL to the model without the virtual token)",
        "rule": INJECTION_RULE,
        "metrics": INJECTION_METRICS,
    },
    "inject_placeholder": {
        "title": "Injection into an SFT model trained with a placeholder position (the consumer has seen the input)",
        "rule": INJECTION_RULE,
        "metrics": INJECTION_METRICS,
    },
    "inject_shuffled": {
        "title": "Shuffled control: the injector reads another prompt's hidden state",
        "rule": INJECTION_RULE,
        "metrics": INJECTION_METRICS,
    },
    "grid_policy": {
        "title": "Grid world: the LM's hidden state helps an offline-trained policy (return on unseen levels)",
        "rule": {
            "metric": f"{GRID}hidden_minus_obs.return_diff",
            "at_least": 0.05,
            "why": "returns lie in [0, 1] (1 minus the step share used); 0.05 more on the same unseen levels than the "
            "obs-only policy is about a tenth of the gap between random and the behaviour policy",
        },
        "metrics": [
            f"{GRID}agents.hidden.return_mean",
            f"{GRID}agents.obs.return_mean",
            f"{GRID}hidden_minus_obs.return_diff",
            f"{GRID}agents.behaviour.return_mean",
            f"{GRID}agents.random.return_mean",
            f"{GRID}agents.hidden.success_rate",
            f"{GRID}agents.obs.success_rate",
        ],
    },
}


def stale_claims(claims: dict) -> dict[str, str]:
    """Entries of a claims file written before their claim's metrics changed meaning (a claim's `revision` goes up
    with each such change, `revised` says what changed): claim id -> what changed. Their numbers are of the old
    definition; the report leaves them out and says so."""
    return {
        claim_id: CLAIMS[claim_id].get("revised", "its metrics changed meaning")
        for claim_id, stored in claims.get("claims", {}).items()
        if claim_id in CLAIMS and stored.get("revision", 1) < CLAIMS[claim_id].get("revision", 1)
    }


# Claims written before claims named their model were all swept on the default scratch model of that time
EARLIER_MODEL = {
    "source": "scratch", "arch": "llama", "hidden_size": 64, "layers": 4, "heads": 4, "kv_heads": None,
    "intermediate_size": 256, "max_positions": 64,
}  # fmt: skip


def model_identity(model: dict) -> dict:
    """What a claim's numbers are for, from params.yaml's `model` section: the scratch model's architecture and
    sizes, or a hub id / local directory and its revision; plus the adapter and its settings when one trains
    (`adapter: lora`) and the weights' dtype when it is not float32. Full fine-tuning in float32 adds nothing, so
    claims swept before adapters and dtypes existed stay this model's."""
    training = ("adapter", "lora", "dtype")
    adapter = {k: model[k] for k in ("adapter", "lora") if k in model} if model.get("adapter", "none") != "none" else {}
    if model.get("dtype", "float32") != "float32":
        adapter["dtype"] = model["dtype"]
    if model.get("source", "scratch") == "scratch":
        return (
            {"source": "scratch"}
            | {k: v for k, v in model.items() if k not in ("source", "revision", *training)}
            | adapter
        )
    return {"source": model["source"], "revision": model.get("revision")} | adapter


def claims_of_another_model(claims: dict, model: dict) -> list[str]:
    """The claims whose sweep ran on another model than `model` (params.yaml's `model` section): a report of this
    model leaves their numbers out."""
    this = model_identity(model)
    return [k for k, claim in claims.get("claims", {}).items() if claim.get("model", EARLIER_MODEL) != this]


def verdict(rule: dict, row: dict) -> dict:
    """The verdict of `rule` on one sweep row (one configuration's interval of the rule's metric); see the module
    docstring. `bound`: the smallest effect the interval excludes (low for at_least, high for at_most)."""
    decided = {"config": row["config"], "n": row["n"], "mean": row["mean"], "low": row["low"], "high": row["high"]}
    if row["n"] < MIN_SEEDS or row["low"] is None:
        return decided | {"verdict": "too few seeds", "bound": None}
    if "at_least" in rule:
        threshold, bound = rule["at_least"], row["low"]
        holds, refuted = row["low"] >= threshold, row["high"] < threshold
    else:
        threshold, bound = rule["at_most"], row["high"]
        holds, refuted = row["high"] <= threshold, row["low"] > threshold
    return decided | {"verdict": "holds" if holds else "refuted" if refuted else "undecided", "bound": bound}


def verdicts(claim_id: str, rows: list[dict]) -> list[dict]:
    """Each configuration's verdict of the claim's rule, from the claim's rows (those of the rule's metric)."""
    rule = CLAIMS[claim_id]["rule"]
    return [verdict(rule, row) for row in rows if row["metric"] == rule["metric"]]


def rule_text(rule: dict) -> str:
    """A rule in one sentence: the metric, the side and size of the effect that matters, and why."""
    side, threshold = ("≥", rule["at_least"]) if "at_least" in rule else ("≤", rule["at_most"])
    return (
        f"holds if the 95% interval of `{rule['metric']}` lies entirely {side} {threshold:+.2f}, refuted if entirely "
        f"on the other side, else undecided; at least {MIN_SEEDS} seeds per arm. Why this size: {rule['why']}"
    )


def verdict_lines(claim_id: str, entry: dict) -> list[str]:
    """The rule and each configuration's verdict of a claims-file entry, as markdown list items; an entry written
    before rules existed gets the current rule and 'no verdict'."""
    rule = entry.get("rule") or CLAIMS.get(claim_id, {}).get("rule")
    if rule is None:
        return []
    lines = [f"- Rule: {rule_text(rule)}."]
    if "verdicts" not in entry:
        seeds = sorted({row["n"] for row in entry.get("rows", [])})
        return lines + [
            f"- No verdict: swept before the rule existed ({', '.join(map(str, seeds)) or 'no'} seeds per arm, "
            f"Student t-intervals); rerun its sweep with at least {MIN_SEEDS} seeds per arm and `--claims {claim_id}`."
        ]
    side = "below" if "at_least" in rule else "above"
    for v in entry["verdicts"]:
        config = ", ".join(f"{k}={value}" for k, value in v["config"].items()) or "defaults"
        interval = "no interval" if v["low"] is None else f"[{v['low']:+.3f}, {v['high']:+.3f}]"
        excludes = "" if v["bound"] is None else f"; it excludes effects {side} {v['bound']:+.3f}"
        lines.append(f"- {config}: **{v['verdict']}**: mean {v['mean']:+.3f}, {interval}, n {v['n']}{excludes}.")
    return lines


def update_claims(path: str | Path, ids: list[str], summary: dict, model: dict) -> dict:
    """Rewrite the entries `ids` of the claims file from a sweep `summary` of `model` (params.yaml's `model`
    section, recorded as `model_identity`); other entries stay as they are."""
    unknown = [i for i in ids if i not in CLAIMS]
    if unknown:
        raise KeyError(f"unknown claim(s) {unknown}; known: {sorted(CLAIMS)}")
    path = Path(path)
    claims = json.loads(path.read_text()) if path.exists() else {"claims": {}}
    for claim_id in ids:
        metrics = CLAIMS[claim_id]["metrics"]
        rows = sorted(
            (r for r in summary["rows"] if r["metric"] in metrics), key=lambda r: metrics.index(r["metric"])
        )  # stable: configurations stay in sweep order under each metric
        if not rows and summary["rows"]:
            raise KeyError(
                f"claim {claim_id!r}: the sweep's experiments report none of its metrics {metrics}; are the stages "
                "that write them among the targets, and their metrics files DVC outputs that `dvc exp show` can read?"
            )
        claims["claims"][claim_id] = {
            **CLAIMS[claim_id],
            "model": model_identity(model),
            "sweep": {k: summary[k] for k in ("command", "baseline", "keys", "seeds", "targets", "interval", "counts")}
            | {k: summary[k] for k in ("unit", "stage_seeds") if k in summary},
            "rows": rows,
            "verdicts": verdicts(claim_id, rows),
        }
    with atomic_output(path) as partial:
        partial.write_text(json.dumps(claims, indent=2, sort_keys=True) + "\n")
    return claims
