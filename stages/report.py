"""report: reports/report.md with the comparison table and figures (reports/*.png)."""

import json

import polars as pl

from latentlab.common.atomic import atomic_output
from latentlab.common.inputs import InputError
from latentlab.figures import (
    comparison_table,
    plot_accuracy_by_parity,
    plot_parameters_vs_accuracy,
    plot_training_curves,
)
from stages.common import METRICS, PLOTS, REPORTS, stage

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


def policy_section(path) -> str:
    """The grid-world returns table from metrics/policy.json (the policy stage), and whether the state helped."""
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
        raise InputError(f"{path} does not exist: run `dvc repro evaluate`")
    metrics = json.loads(path.read_text())
    curves = {name: (pl.read_csv(PLOTS / f"{name}.csv"), columns) for name, columns in CURVES.items()}
    with atomic_output(REPORTS) as out:
        out.mkdir(parents=True)
        plot_training_curves(curves, out / "training.png")
        plot_accuracy_by_parity(metrics, out / "accuracy_by_parity.png")
        efficiency = {name: metrics[name] for name in EFFICIENCY}
        plot_parameters_vs_accuracy(efficiency, out / "parameters_vs_accuracy.png")
        g = params.grpo
        (out / "report.md").write_text(
            "# latentlab report\n\n"
            f"Seed {params.seed}; model `{params.model.source}`; GRPO: {g.steps} steps × {g.prompts_per_step} prompts "
            f"× G={g.group_size}, even_bonus={g.even_bonus}, temperature={g.temperature}, beta={g.beta}.\n\n"
            "## Held-out accuracy\n\n"
            f"{comparison_table(metrics)}\n\n"
            f"{even_answer_finding(metrics)}\n\n"
            "![accuracy by parity](accuracy_by_parity.png)\n\n"
            "## Trainable parameters vs accuracy\n\n"
            f"`inject` trains only an injector (layer {params.inject.layer}, lr {params.inject.lr}, l2 {params.inject.l2}) "
            "on the frozen SFT model with grpo's reward, sampler, prompts, groups and steps.\n\n"
            f"{comparison_table(efficiency, EFFICIENCY_COLUMNS)}\n\n"
            "![trainable parameters vs accuracy](parameters_vs_accuracy.png)\n\n"
            + policy_section(METRICS / "policy.json")
            + "## Training\n\n![training curves](training.png)\n"
        )
    print((REPORTS / "report.md").read_text())


if __name__ == "__main__":
    main()
