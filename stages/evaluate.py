"""evaluate: score every model with one harness on the held-out test set.

-> metrics/eval.json (per model: accuracy overall / odd / even, MAE, parse rate, reward, ...),
   plots/accuracy_by_parity.csv, data/eval/predictions.parquet (every completion, for inspection).
"""

import polars as pl

from latentlab.common.atomic import atomic_output
from latentlab.common.inputs import read_table
from latentlab.hidden.nla_table import read_nla_table
from latentlab.lm.modeling import read_manifest
from latentlab.policies.loading import load_policy
from latentlab.policies.nla_actor import load_actor
from latentlab.policies.nla_critic import load_critic
from latentlab.tasks.arithmetic import PROBLEM_SCHEMA
from latentlab.tasks.evaluation import evaluate_policy
from latentlab.tasks.nla_eval import evaluate_nla
from latentlab.tasks.rewards import ArithmeticReward
from stages.common import METRICS, MODELS, PLOTS, SYNTH, setup, stage, write_json

SCORED = ["base", "sft", "grpo", "inject", "surgery"]  # in DAG order; each is a dep in dvc.yaml


@stage
def main(params):
    run = setup(params)
    test = read_table(SYNTH / "test.parquet", PROBLEM_SCHEMA)
    reward = ArithmeticReward(params.grpo.even_bonus)  # the task reward GRPO optimises
    metrics, predictions = {}, []
    for name in SCORED:
        directory = MODELS / name
        scores, rows = evaluate_policy(
            load_policy(directory, run.device),
            test,
            reward,
            params.evaluate.batch_size,
            params.evaluate.max_new_tokens,
            desc=f"evaluate {name}",
        )
        metrics[name] = {**scores, "trained_parameters": read_manifest(directory).get("trained_parameters")}
        predictions.append(rows.with_columns(model=pl.lit(name)))
        print(f"{name}: " + ", ".join(f"{k}={v:.3f}" for k, v in scores.items() if isinstance(v, float)))

    by_parity = pl.DataFrame(
        [{"model": m, "parity": p, "accuracy": s[f"accuracy_{p}"]} for m, s in metrics.items() for p in ("odd", "even")]
    )
    write_json(METRICS / "eval.json", metrics)
    with atomic_output(PLOTS / "accuracy_by_parity.csv") as partial:
        by_parity.write_csv(partial)
    with atomic_output("data/eval/predictions.parquet") as partial:
        pl.concat(predictions).write_parquet(partial)
    write_json(METRICS / "nla.json", nla_metrics(params, run))


def nla_metrics(params, run) -> dict:
    """NLA on the held-out vectors: each actor (SFT, RL) with the critic trained beside it, controls, ceiling."""
    table, vectors = read_nla_table("data/labels/nla_eval.parquet")
    train, train_vectors = read_nla_table("data/labels/nla.parquet")
    result = {"algo": params.nla_rl.algo}
    for name in ("nla_sft", "nla_rl"):
        result[name] = evaluate_nla(
            {name: load_actor(MODELS / name / "actor", run.device)},
            load_critic(MODELS / name / "critic", run.device),
            vectors,
            table.column("response").to_pylist(),
            table.column("prompt").to_pylist(),
            (train_vectors, train.column("prompt").to_pylist()),
            getattr(params.nla_rl, params.nla_rl.algo).max_new_tokens,
            params.evaluate.batch_size,
            params.seed,
        )
        scores = result[name]["actors"][name]
        print(
            f"{name}: FVE {scores['fve']:.3f} (shuffled {scores['shuffled']['fve']:.3f}, "
            f"gold text {result[name]['gold_text']['fve']:.3f})"
        )
    return result


if __name__ == "__main__":
    main()
