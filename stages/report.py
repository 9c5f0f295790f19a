"""report: reports/report.md with the comparison table and figures (reports/*.png)."""

import json

import polars as pl

from flows.claims import INJECT, claims_of_another_model, difference_name, stale_claims, verdict_lines
from latentlab.common.atomic import atomic_output
from latentlab.common.inputs import InputError
from latentlab.figures import (
    claims_markdown,
    comparison_table,
    plot_accuracy_by_parity,
    plot_parameters_vs_accuracy,
    plot_training_curves,
    provenance_lines,
    summary_table,
)
from stages.common import stage
from stages.paths import CLAIMS, METRICS, PLOTS, REPORTS, SOURCE

CURVES = {  # training log -> columns drawn
    "base": ["loss"],
    "sft": ["loss"],
    "grpo": ["reward_mean", "heldout_accuracy", "heldout_accuracy_even"],
    "inject": ["reward_mean", "heldout_accuracy", "heldout_accuracy_even"],
}
EFFICIENCY = ["sft", "grpo", "inject"]  # what training which parameters buys
EFFICIENCY_COLUMNS = {
    "trained_parameters": "trained params",
    "accuracy": "accuracy",
    "accuracy_odd": "acc. odd y",
    "accuracy_even": "acc. even y",
}


def even_answer_finding(metrics: dict) -> str:
    """The science question of the spine, answered from the numbers."""
    b, s, g = (metrics[n]["accuracy_even"] for n in ("base", "sft", "grpo"))
    lost = "lost" if s < b else "did not lose"
    recovered = "recovered" if g > s else "did not recover"
    return (
        f"Accuracy on even answers went from {b:.3f} (base) to {s:.3f} after SFT on the odd-only set "
        f"(SFT {lost} even answers) and to {g:.3f} after GRPO with the even bonus "
        f"(GRPO {recovered} them; change {g - s:+.3f}). Odd answers: {metrics['base']['accuracy_odd']:.3f} → "
        f"{metrics['sft']['accuracy_odd']:.3f} → {metrics['grpo']['accuracy_odd']:.3f}."
    )


SURGERY_ARMS = ("sac", "random", "grpo_only")
SURGERY_PANELS = {  # plots/surgery_arms.csv column suffix -> panel, the three arms side by side
    "held-out accuracy": "heldout_accuracy",
    "GRPO reward": "reward_mean",
    "surgery reward (nats)": "surgery_reward",
    "commits": "commits",
}


def surgery_section(params, out) -> str:
    """The surgery stage's three arms: test accuracy and commits (metrics/surgery.json), curves side by side."""
    results = json.loads((METRICS / "surgery.json").read_text())
    arms = pl.read_csv(PLOTS / "surgery_arms.csv")
    panels = {title: (arms, [f"{a}_{suffix}" for a in SURGERY_ARMS]) for title, suffix in SURGERY_PANELS.items()}
    plot_training_curves(panels, out / "surgery.png")
    table = comparison_table(
        {"after phase 1": results["after_phase_1"], **{a: results[a] for a in SURGERY_ARMS}},
        {"accuracy": "accuracy", "accuracy_odd": "acc. odd y", "accuracy_even": "acc. even y", "commits": "commits"},
    )
    s = params.surgery
    return (
        "## Attention surgery\n\n"
        f"Phases {s.phases} (GRPO only / surgery only / joint) from `sft`; edits of blocks {s.layers} "
        f"({', '.join(s.projections)}), head factors within 1 ± {s.max_scale}, commit when the probe reward > "
        f"{s.commit_threshold} nats. Controls from the same phase-1 state and streams: a random surgeon under the "
        "same rule, and GRPO only for the same GRPO steps. Test accuracy (all held-out problems):\n\n"
        f"{table}\n\nSAC surgeon minus GRPO only: {results['sac_minus_grpo_only']:+.3f}; "
        f"minus the random surgeon: {results['sac_minus_random']:+.3f} (one seed).\n\n![surgery](surgery.png)\n\n"
    )


NLA_COLUMNS = {
    "fve": "FVE",
    "cosine": "cosine",
    "mse": "MSE (t)",
    "shuffled_fve": "FVE shuffled",
    "shuffled_cosine": "cosine shuffled",
    "gold_fve": "FVE gold text",
    "empty_fve": "FVE empty text",
    "answer_exact_match": "answer EM",
    "probe": "probe EM",
}


def nla_section(nla: dict, out) -> str:
    """FVE and cosine of critic(actor(v)) for the SFT and RL actors, with the controls, the RL curves and decoded
    examples."""
    rows = {}
    for name in ("nla_sft", "nla_rl"):
        block, scores = nla[name], nla[name]["actors"][name]
        rows[name if name == "nla_sft" else f"nla_rl ({nla['algo']})"] = {
            **scores,
            "shuffled_fve": scores["shuffled"]["fve"],
            "shuffled_cosine": scores["shuffled"]["cosine"],
            "gold_fve": block["gold_text"]["fve"],
            "empty_fve": block["empty_text"]["fve"],
            "probe": block["linear_probe_exact_match"],
        }
    curve = pl.read_csv(PLOTS / "nla_rl.csv")
    plot_training_curves(
        {f"nla_rl: {metric}": (curve, [metric, f"heldout_{metric}"]) for metric in ("fve", "cosine")},
        out / "nla_rl.png",
    )
    examples = "\n".join(
        f"| `{e['gold']!r}` | `{e['explanation']!r}` | {e['mse']:.3f} |"
        for e in nla["nla_rl"]["actors"]["nla_rl"]["examples"]
    )
    return (
        "## Natural language autoencoder\n\n"
        f"Held-out vectors: {nla['nla_sft']['n']}; each actor is read by the critic trained beside it. Targets "
        "t = (v − μ)/σ, μ the training mean and σ one scalar, the RMS norm of the centred training vectors "
        "(mean ‖t‖² = 1 on them); the critic predicts t̂ unnormalised. FVE = 1 − Σ‖t − t̂‖² / Σ‖t − t̄‖² over the "
        "held-out vectors (t̄ their mean: a perfect critic scores 1, the mean predictor 0; the same number on v's "
        "own scale); cosine = mean cos(t̂, t); MSE = mean ‖t − t̂‖². Shuffled: the actor reads another row's "
        "vector; gold: the critic on the text the vector came from (its ceiling); empty: the critic on an empty "
        "text; answer EM: the answer the explanation writes vs the true answer, beside a ridge probe on the "
        "vectors.\n\n"
        f"{comparison_table(rows, NLA_COLUMNS)}\n\n"
        "![NLA RL: FVE and cosine per step](nla_rl.png)\n\n"
        "| text the vector came from | RL actor's explanation | MSE (t) |\n|---|---|---:|\n"
        f"{examples}\n"
    )


def claims_section(claims: dict, model: dict) -> str:
    """Every claim of this run's model with its rule, its verdicts and its intervals over seeds, from the committed
    sweep result file; a claim whose metrics changed meaning since its sweep ran is named, not shown; claims of
    another model are counted."""
    if not CLAIMS.exists():
        return f"No claims: {CLAIMS} does not exist (run the claims sweep: docs: how-to/sweep.md)."
    stale = stale_claims(claims)
    current = {"claims": {k: c for k, c in claims.get("claims", {}).items() if k not in stale}}
    notes = [
        f"Claim `{k}` ({claims['claims'][k]['title']}) is not shown: its sweep ran before {why}. Rerun that sweep "
        f"with `--claims {k}` (docs: how-to/sweep.md)."
        for k, why in stale.items()
    ]
    if not claims.get("claims"):
        return f"No claims of this model in {CLAIMS}: run the claims sweep on it (docs: how-to/sweep.md)."
    if not current["claims"]:
        return "\n\n".join(notes)
    return "\n\n".join([*(claim_markdown(k, c) for k, c in current["claims"].items()), *notes])


def claim_markdown(claim_id: str, entry: dict) -> str:
    """One claim as claims_markdown draws it, its rule and verdicts under the title (flows/claims.py `verdict_lines`)."""
    title, _, rest = claims_markdown({"claims": {claim_id: entry}}).partition("\n")
    verdicts = verdict_lines(claim_id, entry)
    return "\n".join([title, "", *verdicts, rest] if verdicts else [title, rest]).rstrip("\n")


def this_models_claims(model: dict) -> tuple[dict, str]:
    """The claims file's entries swept on this run's model (`params.model`), and a note naming how many of
    another model are left out ('' when none)."""
    claims = json.loads(CLAIMS.read_text()) if CLAIMS.exists() else {"claims": {}}
    other = claims_of_another_model(claims, model)
    kept = {"claims": {k: c for k, c in claims["claims"].items() if k not in other}}
    note = (
        f"{len(other)} claim(s) of {CLAIMS} were swept on another model than this run's and are not shown here "
        f"({', '.join(f'`{k}`' for k in other)}).\n\n"
        if other
        else ""
    )
    return kept, note


def model_line(params) -> str:
    """Which model this report's numbers are for: the scratch model's shape, or the source and its content hash."""
    m = params.model
    if m.source == "scratch":
        return (
            f"the scratch {m.arch} model built by `base` ({m.layers} layers, hidden {m.hidden_size}, {m.heads} heads"
            f", {m.kv_heads or m.heads} key-value heads, MLP {m.intermediate_size}, context {m.max_positions})"
        )
    source = json.loads(SOURCE.read_text()) if SOURCE.exists() else {}
    pinned = f", sha256 {source['sha256'][:12]}" if "sha256" in source else f", revision {m.revision or 'latest'}"
    return f"`{m.source}`{pinned}"


INJECTION_CLAIMS = ("inject_variants", "inject_align", "inject_placeholder", "inject_shuffled")
INJECTION_COLUMNS = {  # header -> metric, as the sweep names it (metrics/inject.json of each experiment)
    "step-0 accuracy": f"{INJECT}step0.accuracy",
    "after alignment": f"{INJECT}after_align.accuracy",
    "accuracy": f"{INJECT}final.accuracy",
    "odd y": f"{INJECT}final.accuracy_odd",
    "even y": f"{INJECT}final.accuracy_even",
    "− frozen SFT (paired)": difference_name(f"{INJECT}final.accuracy", f"{INJECT}sft.accuracy"),
    "trained params": f"{INJECT}trained_parameters",
}


def injection_section(claims: dict) -> str:
    """Issue 12's table: the frozen SFT model, GRPO of the whole model and every injection configuration the
    `inject_*` claims hold, each over seeds with its interval (rows from results/claims.json)."""
    found = {c: claims["claims"][c] for c in INJECTION_CLAIMS if c in claims.get("claims", {})}
    if not found:
        return "No injection sweeps in the claims file yet (docs: systems/injection.md).\n\n"
    configs: dict[str, dict[str, dict]] = {}
    for claim in found.values():
        for r in claim["rows"]:
            label = ", ".join(f"{k.rsplit('.', 1)[-1]}={v}" for k, v in r["config"].items()) or "(defaults)"
            configs.setdefault(label, {})[r["metric"]] = r
    first = next(iter(configs.values()))  # the SFT model every configuration but placeholder ones starts from
    sft = {f"{INJECT}sft.accuracy{p}": first.get(f"{INJECT}sft.accuracy{p}") for p in ("", "_odd", "_even")}
    rows = {
        "SFT model (frozen, no injection)": {
            "step-0 accuracy": sft[f"{INJECT}sft.accuracy"],
            "accuracy": sft[f"{INJECT}sft.accuracy"],
            "odd y": sft[f"{INJECT}sft.accuracy_odd"],
            "even y": sft[f"{INJECT}sft.accuracy_even"],
        }
    }
    grpo, parity = claims["claims"].get("inject_vs_grpo"), claims["claims"].get("even_recovery")
    if grpo:
        default = [r for r in grpo["rows"] if r["config"].get("grpo.even_bonus") in (None, "0.1")]
        pick = {r["metric"]: r for r in default}
        odd = [r for r in (parity or {}).get("rows", []) if r["metric"] == "grpo.accuracy_odd"]
        odd = [r for r in odd if r["config"].get("grpo.even_bonus") in (None, "0.1")]
        rows["GRPO of the whole model"] = {
            "step-0 accuracy": sft[f"{INJECT}sft.accuracy"],
            "accuracy": pick.get("grpo.accuracy"),
            "odd y": odd[0] if odd else None,
            "even y": pick.get("grpo.accuracy_even"),
            "trained params": pick.get("grpo.trained_parameters"),
        }
    for label, metrics in configs.items():
        rows[f"inject: {label}"] = {header: metrics.get(metric) for header, metric in INJECTION_COLUMNS.items()}
    sources = [claims["claims"][c] for c in ("inject_vs_grpo", "even_recovery") if c in claims["claims"]]
    provenance = [line for claim in [*found.values(), *sources[:1]] for line in provenance_lines(claim["sweep"])[:1]]
    return (
        "## Injection: which variant keeps the virtual token in distribution?\n\n"
        "Held-out accuracy on the whole test set, mean [95% interval] over seeds. Step 0: before any training "
        "(after the alignment phase where there is one, the next column). The paired column is the injector "
        "after GRPO minus the frozen SFT model it reads, per seed. Step times vary run to run, so no DAG output "
        "holds them: `plots/inject_speed.csv` and `plots/grpo_speed.csv` give them.\n\n"
        + summary_table("model", list(INJECTION_COLUMNS), rows)
        + "\n\n"
        + "\n".join(f"- {line}" for line in provenance)
        + "\n\n"
    )


def policy_section(path) -> str:
    """The grid-world returns table from metrics/policy.json (evaluate_grid), and whether the state helped."""
    m = json.loads(path.read_text())
    rows = [
        f"| {name} | {a['return_mean']:.3f} [{a['return_ci95'][0]:.3f}, {a['return_ci95'][1]:.3f}] | "
        f"{a['success_rate']:.3f} [{a['success_ci95'][0]:.3f}, {a['success_ci95'][1]:.3f}] | {a['length_mean']:.1f} |"
        for name, a in m["agents"].items()
    ]
    d = m["hidden_minus_obs"]
    low, high = d["return_diff_ci95"]
    verdict = (
        "the hidden state helped the policy"
        if low > 0
        else "the hidden state hurt the policy"
        if high < 0
        else "no difference these episodes can resolve (the interval holds 0)"
    )
    return (
        f"## Grid world: does the hidden state help the policy?\n\n`{m['env_id']}`, seed {m['seed']}; AWR policies "
        f"with and without the base LM's pooled state (layer {m['layer']}, tokens {m['tokens']}, skip_n "
        f"{m['skip_n']}), evaluated online with live extraction on the same {m['agents']['hidden']['episodes']} "
        "unseen levels as the behaviour policy and random. 95% intervals over episodes.\n\n"
        "| agent | return | success | mean length |\n|---|---:|---:|---:|\n" + "\n".join(rows) + "\n\n"
        f"Hidden − obs-only, paired by level: return {d['return_diff']:+.3f} [{low:+.3f}, {high:+.3f}], success "
        f"{d['success_diff']:+.3f}: {verdict} (seed {m['seed']}).\n\n"
    )


@stage
def main(params):
    path = METRICS / "eval.json"
    if not path.exists():
        raise InputError(f"{path} does not exist: run `dvc repro evaluate_arithmetic`")
    metrics = json.loads(path.read_text())
    curves = {name: (pl.read_csv(PLOTS / f"{name}.csv"), columns) for name, columns in CURVES.items()}
    with atomic_output(REPORTS) as out:
        out.mkdir(parents=True)
        plot_training_curves(curves, out / "training.png")
        plot_accuracy_by_parity(metrics, out / "accuracy_by_parity.png")
        efficiency = {name: metrics[name] for name in EFFICIENCY}
        plot_parameters_vs_accuracy(efficiency, out / "parameters_vs_accuracy.png")
        g = params.grpo
        model = params.model.model_dump()
        claims, other_model_note = this_models_claims(model)
        (out / "report.md").write_text(
            "# latentlab report\n\n"
            f"Every number below is for {model_line(params)}; prompts {params.prompt.describe()}.\n\n"
            f"Seed {params.seed}; GRPO: {g.steps} steps × {g.prompts_per_step} prompts "
            f"× G={g.group_size}, even_bonus={g.even_bonus}, temperature={g.temperature}, beta={g.beta}.\n\n"
            "## Held-out accuracy\n\n"
            f"{comparison_table(metrics)}\n\n"
            f"{even_answer_finding(metrics)}\n\n"
            "![accuracy by parity](accuracy_by_parity.png)\n\n"
            "## Trainable parameters vs accuracy\n\n"
            f"`inject` trains only an injector (variant {params.inject.variant}, layer {params.inject.layer}, "
            f"lr {params.inject.lr}, l2 {params.inject.l2}) "
            "on the frozen SFT model with grpo's reward, sampler, prompts, groups and steps.\n\n"
            f"{comparison_table(efficiency, EFFICIENCY_COLUMNS)}\n\n"
            "![trainable parameters vs accuracy](parameters_vs_accuracy.png)\n\n"
            + injection_section(claims)
            + f"{surgery_section(params, out)}"
            + nla_section(json.loads((METRICS / "nla.json").read_text()), out)
            + policy_section(METRICS / "policy.json")
            + "## Training\n\n![training curves](training.png)\n\n"
            "## Claims\n\nThe same comparisons over several seeds, each with its interval (from a sweep of DVC "
            f"experiments, `{CLAIMS}`); the tables above are the single seed {params.seed} of this run.\n\n"
            f"{other_model_note}{claims_section(claims, model)}\n"
        )
    print((REPORTS / "report.md").read_text())


if __name__ == "__main__":
    main()
