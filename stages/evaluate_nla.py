"""evaluate_nla: the NLA actors and critics on the held-out vectors -> metrics/nla.json.

Each actor (nla_sft's, nla_rl's) is scored with the critic trained beside it: FVE, cosine and MSE of its greedy
explanations, with the controls (shuffled vectors, nearest training prompt) and the ceiling (the gold text);
tasks/nla_eval.py. How nla_rl trained (its algorithm, the explanation length) comes from models/nla_rl's
manifest, not from nla_rl's params; both actors explain with that length.
"""

from latentlab.hidden.nla_table import read_nla_table
from latentlab.lm.modeling import read_manifest
from latentlab.policies.nla_actor import load_actor
from latentlab.policies.nla_critic import load_critic
from latentlab.tasks.nla_eval import NLAEvaluation, evaluate_nla
from stages.common import setup, stage, write_json
from stages.paths import METRICS, MODELS, NLA_EVAL_TABLE, NLA_TABLE


@stage
def main(params):
    write_json(METRICS / "nla.json", nla_metrics(params, setup(params)))


def nla_metrics(params, run) -> dict:
    """NLA on the held-out vectors: each actor (SFT, RL) with the critic trained beside it, controls, ceiling."""
    table, vectors = read_nla_table(NLA_EVAL_TABLE)
    train, train_vectors = read_nla_table(NLA_TABLE)
    trained = read_manifest(MODELS / "nla_rl" / "actor")  # how the RL actor was trained: its algo and length
    result = {"algo": trained["algo"]}
    for name in ("nla_sft", "nla_rl"):
        result[name] = evaluate_nla(
            {name: load_actor(MODELS / name / "actor", run.device)},
            load_critic(MODELS / name / "critic", run.device),
            NLAEvaluation(
                vectors=vectors,
                gold_texts=table.column("response").to_pylist(),
                prompts=table.column("prompt").to_pylist(),
                train_vectors=train_vectors,
                train_prompts=train.column("prompt").to_pylist(),
                max_new_tokens=trained["max_new_tokens"],
                batch=params.evaluate.batch_size,
                seed=params.seed,
            ),
        )
        scores = result[name]["actors"][name]
        print(
            f"{name}: FVE {scores['fve']:.3f}, cosine {scores['cosine']:.3f} (shuffled FVE "
            f"{scores['shuffled']['fve']:.3f}, gold text FVE {result[name]['gold_text']['fve']:.3f})"
        )
    return result


if __name__ == "__main__":
    main()
