"""policy: AWR actor-critics on the grid transitions, with and without the LM's hidden state, then
online evaluation with live extraction -> models/policy/{hidden,obs}, metrics/policy.json.

Training data: data/grid/transitions.zarr and the pooled states of layer `policy.eval.layer` in
data/hidden/grid.zarr (label). Both policies share the code, the seed and the data order; the
observation-only one just does not take the state. Online, four agents play the same levels:
hidden (texts through the base LM live, every `eval.skip_n` steps), obs-only, the behaviour policy
and random. metrics/policy.json: mean return and success rate with 95% intervals, and the paired
difference hidden - obs; wall-clock speeds go to metrics/policy_speed.json (they differ every run).
"""

import numpy as np
import torch

from latentlab.common.atomic import atomic_output
from latentlab.common.inputs import require_model_dir
from latentlab.common.tracking import StepLog
from latentlab.hidden.dataset import pooled_vectors
from latentlab.hidden.store import open_store
from latentlab.policies.actor_critic import ActorCritic, ActorCriticConfig, save_policy
from latentlab.rl.awr import Batch, train_awr
from latentlab.tasks.grid import read_transitions
from latentlab.tasks.grid_online import BehaviourAgent, PolicyAgent, RandomAgent, make_encoder, paired, rollout
from stages.common import GRID, METRICS, MODELS, PLOTS, setup, stage, step_log, write_json

STORE = "data/hidden/grid.zarr"


@stage
def main(params):
    run = setup(params)
    cfg, grid = params.policy, params.grid
    data = read_transitions(GRID / "transitions.zarr")
    hidden = pooled_vectors(STORE, cfg.eval.layer)  # (N, H), read through StoreDataset
    if not np.array_equal(open_store(STORE)["ids"][:], data["ids"]):
        raise ValueError(f"{STORE} does not hold the rows of {GRID / 'transitions.zarr'}: rerun `dvc repro label`")
    image, action, reward, done = (torch.from_numpy(data[k]) for k in ("obs", "action", "reward", "done"))
    logs, policies = {}, {}
    for name, use_hidden in (("hidden", True), ("obs", False)):
        torch.manual_seed(params.seed)  # the same initial CNN and heads for both
        model = ActorCritic(
            ActorCriticConfig(
                image=tuple(data["obs"].shape[1:3]),
                actions=grid.actions,
                hidden_size=hidden.shape[1],
                use_hidden=use_hidden,
                channels=cfg.channels,
                features=cfg.features,
            )
        )
        batch = Batch(image, torch.from_numpy(hidden) if use_hidden else None, action, reward, done)
        if use_hidden:
            model.fit_hidden_scale(batch.hidden)
        logs[name] = step_log(params, f"policy-{name}", params.model_dump(include={"policy", "grid", "seed"}))
        train_awr(model, batch, cfg.awr, torch.Generator().manual_seed(params.seed), logs[name], desc=f"awr {name}")
        logs[name].finish()
        policies[name] = model
    with atomic_output(MODELS / "policy") as out:
        for name, model in policies.items():
            save_policy(model, out / name, layer=cfg.eval.layer if name == "hidden" else None, store=STORE)
    log = StepLog()  # one CSV: hidden_* and obs_* columns side by side (same steps)
    for a, b in zip(logs["hidden"].rows, logs["obs"].rows):
        step, _ = a.pop("step"), b.pop("step")
        log.log(step, **{f"hidden_{k}": v for k, v in a.items()}, **{f"obs_{k}": v for k, v in b.items()})
    log.save(PLOTS / "policy.csv")

    labelled = dict(open_store(STORE).attrs)
    encoder = make_encoder(cfg.eval, require_model_dir(MODELS / "base"), labelled, run.device, params.seed)
    n, seed = cfg.eval.envs, params.seed + 10_000  # evaluation levels differ from the data's
    agents = {
        "hidden": lambda envs: PolicyAgent(policies["hidden"], n, encoder, cfg.eval, seed),
        "obs": lambda envs: PolicyAgent(policies["obs"], n, None, cfg.eval, seed),
        "behaviour": lambda envs: BehaviourAgent(envs, grid.actions, grid.random_share, seed),
        "random": lambda envs: RandomAgent(grid.actions, seed),
    }
    episodes = {name: rollout(grid.env, make, cfg.eval, seed, desc=f"online {name}") for name, make in agents.items()}
    summaries = {name: e.summary() for name, e in episodes.items()}
    speeds = {name: s.pop("env_steps_per_s") for name, s in summaries.items()}
    tokens = cfg.eval.tokens or labelled["tokens"]
    write_json(
        METRICS / "policy.json",
        {
            "env_id": grid.env_id,
            "seed": params.seed,
            "layer": cfg.eval.layer,
            "tokens": tokens,
            "skip_n": cfg.eval.skip_n,
            "agents": summaries,
            "hidden_minus_obs": paired(episodes["hidden"], episodes["obs"]),
        },
    )
    write_json(METRICS / "policy_speed.json", {"env_steps_per_s": speeds, "tokens": tokens, "server": cfg.eval.server})
    for name, s in summaries.items():
        print(
            f"{name:9s} return {s['return_mean']:.3f} [{s['return_ci95'][0]:.3f}, {s['return_ci95'][1]:.3f}]  "
            f"success {s['success_rate']:.3f}  {speeds[name]:,.0f} env steps/s"
        )


if __name__ == "__main__":
    main()
