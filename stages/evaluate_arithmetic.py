"""evaluate_arithmetic: score every arithmetic model on the held-out problems with one harness.

-> metrics/eval.json (per LM: accuracy overall / odd / even, MAE, parse rate, reward, trained parameters),
   plots/accuracy_by_parity.csv, data/eval/predictions.parquet (every completion, for inspection).
Reruns only when a scored model, the test set or the harness changes; the NLA and grid scores are their own
stages (evaluate_nla, evaluate_grid).
"""

import polars as pl

from latentlab.common.atomic import atomic_output
from latentlab.common.inputs import read_table
from latentlab.lm.modeling import read_manifest
from latentlab.policies.loading import load_policy
from latentlab.tasks.arithmetic import PROBLEM_SCHEMA
from latentlab.tasks.evaluation import evaluate_policy
from latentlab.tasks.rewards import ArithmeticReward
from stages.common import setup, stage, write_json
from stages.paths import METRICS, MODELS, PLOTS, PREDICTIONS, SYNTH

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
            load_policy(directory, run.device, prompt_format=params.prompt),
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
    with atomic_output(PREDICTIONS) as partial:
        pl.concat(predictions).write_parquet(partial)


if __name__ == "__main__":
    main()
