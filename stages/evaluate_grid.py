"""evaluate_grid: the grid-world returns table -> metrics/policy.json (and metrics/policy_speed.json).

The hidden-state and obs-only policies, the behaviour policy and random play the same unseen levels online; the
hidden agent's texts go through the base LM live, extracted as data/hidden/grid.zarr's attributes say they were
labelled (layer `policy.eval.layer`). Speeds (env steps/s) differ every run and so live apart, untracked.
"""

from latentlab.common.inputs import require_model_dir
from latentlab.hidden.store import store_attrs
from latentlab.policies.actor_critic import load_policy as load_grid_policy
from latentlab.tasks.grid_online import BehaviourAgent, PolicyAgent, RandomAgent, make_encoder, paired, rollout
from stages.common import setup, stage, write_json
from stages.paths import GRID_STORE, METRICS, MODELS


@stage
def main(params):
    returns, speeds = grid_metrics(params, setup(params))
    write_json(METRICS / "policy.json", returns)
    write_json(METRICS / "policy_speed.json", speeds)


def grid_metrics(params, run) -> tuple[dict, dict]:
    """The grid-world returns table: the hidden-state and obs-only policies, the behaviour policy and random
    play the same unseen levels online (the hidden agent's texts go through the base LM live, every
    `eval.skip_n` steps). -> (returns with 95% intervals and the paired hidden - obs difference, speeds:
    env steps/s, which differ every run and so live apart)."""
    cfg, grid = params.policy.eval, params.grid
    labelled = store_attrs(GRID_STORE)  # how the training states were extracted: the live encoder repeats it
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
        "tokens": cfg.tokens or labelled.tokens,
        "skip_n": cfg.skip_n,
        "agents": summaries,
        "hidden_minus_obs": paired(episodes["hidden"], episodes["obs"]),
    }
    return returns, {"env_steps_per_s": speeds, "tokens": returns["tokens"], "server": cfg.server}


if __name__ == "__main__":
    main()
