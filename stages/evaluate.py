"""evaluate: score every model on held-out data, each kind with its one harness.

-> metrics/eval.json (per LM: accuracy overall / odd / even, MAE, parse rate, reward, ...),
   plots/accuracy_by_parity.csv, data/eval/predictions.parquet (every completion, for inspection);
   metrics/nla.json (NLA actors and critics on the held-out vectors: FVE, cosine, MSE, with controls and
   ceiling; tasks/nla_eval.py);
   metrics/policy.json (the grid-world returns table: four agents online on unseen levels).
"""

import polars as pl

from latentlab.common.atomic import atomic_output
from latentlab.common.inputs import read_table, require_model_dir
from latentlab.hidden.nla_table import read_nla_table
from latentlab.hidden.store import open_store
from latentlab.lm.modeling import read_manifest
from latentlab.policies.actor_critic import load_policy as load_grid_policy
from latentlab.policies.loading import load_policy
from latentlab.policies.nla_actor import load_actor
from latentlab.policies.nla_critic import load_critic
from latentlab.tasks.arithmetic import PROBLEM_SCHEMA
from latentlab.tasks.evaluation import evaluate_policy
from latentlab.tasks.grid_online import BehaviourAgent, PolicyAgent, RandomAgent, make_encoder, paired, rollout
from latentlab.tasks.nla_eval import NLAEvaluation, evaluate_nla
from latentlab.tasks.rewards import ArithmeticReward
from stages.common import METRICS, MODELS, PLOTS, SYNTH, setup, stage, write_json

GRID_STORE = "data/hidden/grid.zarr"  # the texts' labelling settings (layer, tokens) the live encoder repeats
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
    with atomic_output("data/eval/predictions.parquet") as partial:
        pl.concat(predictions).write_parquet(partial)
    write_json(METRICS / "nla.json", nla_metrics(params, run))
    returns, speeds = grid_metrics(params, run)
    write_json(METRICS / "policy.json", returns)
    write_json(METRICS / "policy_speed.json", speeds)


def nla_metrics(params, run) -> dict:
    """NLA on the held-out vectors: each actor (SFT, RL) with the critic trained beside it, controls, ceiling."""
    table, vectors = read_nla_table("data/labels/nla_eval.parquet")
    train, train_vectors = read_nla_table("data/labels/nla.parquet")
    result = {"algo": params.nla_rl.algo}
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
                max_new_tokens=getattr(params.nla_rl, params.nla_rl.algo).max_new_tokens,
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


def grid_metrics(params, run) -> tuple[dict, dict]:
    """The grid-world returns table: the hidden-state and obs-only policies, the behaviour policy and random
    play the same unseen levels online (the hidden agent's texts go through the base LM live, every
    `eval.skip_n` steps). -> (returns with 95% intervals and the paired hidden - obs difference, speeds:
    env steps/s, which differ every run and so live apart)."""
    cfg, grid = params.policy.eval, params.grid
    labelled = dict(open_store(GRID_STORE).attrs)
    encoder = make_encoder(cfg, require_model_dir(MODELS / "base"), labelled, run.device, params.seed)
    policies = {name: load_grid_policy(MODELS / "policy" / name, run.device) for name in ("hidden", "obs")}
    n, seed = cfg.envs, params.seed + 10_000  # evaluation levels differ from the training data's
    agents = {
        "hidden": lambda envs: PolicyAgent(policies["hidden"], n, encoder, cfg, seed),
        "obs": lambda envs: PolicyAgent(policies["obs"], n, None, cfg, seed),
        "behaviour": lambda envs: BehaviourAgent(envs, grid.actions, grid.random_share, seed),
        "random": lambda envs: RandomAgent(grid.actions, seed),
    }
    episodes = {name: rollout(grid.env, make, cfg, seed, desc=f"online {name}") for name, make in agents.items()}
    summaries = {name: e.summary() for name, e in episodes.items()}
    speeds = {name: s.pop("env_steps_per_s") for name, s in summaries.items()}
    for name, s in summaries.items():
        print(
            f"{name:9s} return {s['return_mean']:.3f} [{s['return_ci95'][0]:.3f}, {s['return_ci95'][1]:.3f}]  "
            f"success {s['success_rate']:.3f}  {speeds[name]:,.0f} env steps/s"
        )
    returns = {
        "env_id": grid.env_id,
        "seed": params.seed,
        "layer": cfg.layer,
        "tokens": cfg.tokens or labelled["tokens"],
        "skip_n": cfg.skip_n,
        "agents": summaries,
        "hidden_minus_obs": paired(episodes["hidden"], episodes["obs"]),
    }
    return returns, {"env_steps_per_s": speeds, "tokens": returns["tokens"], "server": cfg.server}


if __name__ == "__main__":
    main()
