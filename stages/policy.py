"""policy: AWR actor-critics on the grid transitions, with and without the LM's hidden state
-> models/policy/{hidden,obs}, plots/policy.csv (training curves side by side).

Training data: data/grid/transitions.zarr and the pooled states of layer `policy.eval.layer` in
data/hidden/grid.zarr (label). Both policies share the code, the seed and the data order; the
observation-only one just does not take the state. `evaluate` plays them online (metrics/policy.json).
Under torchrun (`launcher`) each AWR minibatch is split across ranks under DDP (README: Training on several processes, GPUs or nodes).
"""

import numpy as np
import torch

from latentlab.common.atomic import atomic_output
from latentlab.common.tracking import StepLog
from latentlab.hidden.dataset import pooled_vectors
from latentlab.hidden.store import open_store
from latentlab.policies.actor_critic import ActorCritic, ActorCriticConfig, save_policy
from latentlab.rl.awr import Batch, train_awr
from latentlab.tasks.grid import read_transitions
from stages.common import setup, stage, step_log
from stages.execution import supervised, whole
from stages.paths import GRID_STORE, GRID_TRANSITIONS, MODELS, PLOTS


@stage(torchrun=True)
def main(params):
    run = setup(params)
    cfg, grid = params.policy, params.grid
    data = read_transitions(GRID_TRANSITIONS)
    hidden = pooled_vectors(GRID_STORE, cfg.eval.layer)  # (N, H), read through StoreDataset
    if not np.array_equal(open_store(GRID_STORE)["ids"][:], data["ids"]):
        raise ValueError(f"{GRID_STORE} does not hold the rows of {GRID_TRANSITIONS}: rerun `dvc repro label`")
    image, action, reward, done = (torch.from_numpy(data[k]) for k in ("obs", "action", "reward", "done"))
    logs, policies, learners = {}, {}, []
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
        generator = torch.Generator().manual_seed(params.seed)
        learners.append(
            train_awr(model, batch, cfg.awr, generator, logs[name], f"awr {name}", execution=supervised(run, params))
        )
        logs[name].finish()
        policies[name] = model
    with whole(*learners):  # fsdp: the whole weights gathered to rank 0 (every rank takes part)
        if not run.leader:  # under torchrun rank 0 alone writes the outputs
            return
        with atomic_output(MODELS / "policy") as out:
            for name, model in policies.items():
                save_policy(
                    model, out / name, layer=cfg.eval.layer if name == "hidden" else None, store=str(GRID_STORE)
                )
    log = StepLog()  # one CSV: hidden_* and obs_* columns side by side (same steps)
    for a, b in zip(logs["hidden"].rows, logs["obs"].rows):
        step, _ = a.pop("step"), b.pop("step")
        log.log(step, **{f"hidden_{k}": v for k, v in a.items()}, **{f"obs_{k}": v for k, v in b.items()})
    log.save(PLOTS / "policy.csv")


if __name__ == "__main__":
    main()
