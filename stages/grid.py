"""grid: behaviour transitions in the grid world -> data/grid/transitions.zarr, data/grid/texts.parquet.

The BabyAI bot mixed with random actions (`grid.random_share`) plays `grid.env_id` in `grid.envs`
vectorised envs until `grid.transitions` are collected; each observation's text rendering goes to
texts.parquet (id, prompt, episode, step), which `base` pretrains on and `label` runs the LM over.
"""

from latentlab.common.atomic import atomic_output
from latentlab.tasks.grid import collect, write_transitions
from stages.common import stage
from stages.paths import GRID


@stage
def main(params):
    cfg = params.grid
    data = collect(cfg.env, cfg.behaviour, params.seed)
    with atomic_output(GRID) as out:
        out.mkdir(parents=True)
        write_transitions(out / "transitions.zarr", data, {"grid": cfg.model_dump(), "seed": params.seed})
        data.table().write_parquet(out / "texts.parquet")
    ends = data.done
    print(
        f"data/grid: {len(data)} transitions, {int(data.episode[-1]) + 1} episodes of {cfg.env_id}, "
        f"success {float((data.reward[ends] > 0).mean()):.3f}, mean return {float(data.reward[ends].mean()):.3f}, "
        f"longest text {max(map(len, data.text))} chars"
    )


if __name__ == "__main__":
    main()
