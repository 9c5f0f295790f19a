"""The grid world: a MiniGrid level with RGB image observations, a text rendering of each one, and
transitions of a behaviour policy (the BabyAI bot mixed with random actions) in a Zarr store.

Observation of one env: {"image": (H, W, 3) uint8, the agent's partial view drawn by MiniGrid's
RGBImgPartialObsWrapper at `tile_size` pixels a cell; "text": the mission plus the objects in view}.
The text is built from the symbolic partial view (7 x 7 cells, the agent at the bottom middle facing
up): "go to the red ball: red ball 2r1, grey key 0l2" = a red ball 2 cells ahead and 1 to the right,
a grey key beside the agent 2 to the left. Nearest objects first, as many as fit in `text_chars`
(the LM's context must also hold the tokens it generates after the prompt).

Transitions store (Zarr v3, chunked along N inside shard files like the hidden-state stores):
    episode (N,) int64, step (N,) int32, obs / next_obs (N, H, W, 3) uint8, action (N,) int64,
    reward (N,) float32, done (N,) bool (terminated or truncated), log_prob (N,) float32 (the
    behaviour policy's log pi_b(a|s)), ids (N,) int64 (the row of the text table)
Episodes are whole and contiguous, in the order they ended, so TD(lambda) can sweep them backwards.
MiniGrid's reward 1 - 0.9 t / max_steps counts the steps, so the time limit belongs to the task and a
time-out ends an episode like success does (`done`, nothing bootstrapped after it).
"""

from dataclasses import dataclass
from pathlib import Path

import gymnasium as gym
import numpy as np
import polars as pl
import zarr
from gymnasium import spaces
from pydantic import Field

from latentlab.common.atomic import atomic_output
from latentlab.common.config import Config
from latentlab.common.tracking import progress
from latentlab.hidden.store import add_array, rows_array_metadata
from latentlab.lm.tokenizer import CHARACTERS

FORMAT = "latentlab.grid/1"
TEXT_SCHEMA = {"id": pl.Int64, "prompt": pl.String, "episode": pl.Int64, "step": pl.Int32}
AHEAD_ROW, AGENT_COLUMN = 6, 3  # where the agent sits in MiniGrid's 7 x 7 partial view (facing row 0)


class GridConfig(Config):
    env_id: str = "BabyAI-GoToLocalS8N2-v0"
    """A registered MiniGrid/BabyAI level (the BabyAI bot is the expert, so a BabyAI level)."""
    tile_size: int = Field(4, ge=1, le=32)
    """Pixels per grid cell of the RGB partial view: 7 cells x 4 px = 28 x 28 images."""
    actions: int = Field(3, ge=1, le=7)
    """The first `actions` MiniGrid actions are the action space (3: left, right, forward; GoTo needs no more)."""
    text_chars: int = Field(56, ge=8)
    """Longest text rendering: it plus the tokens generated after it must fit the LM's context."""


class BehaviourConfig(Config):
    transitions: int = Field(8192, gt=0)
    """Transitions to collect (whole episodes: the last one may overshoot)."""
    envs: int = Field(16, gt=0)
    """Vectorised environments stepped together."""
    random_share: float = Field(0.5, ge=0, le=1)
    """epsilon: each step takes a uniformly random action with this probability, else the bot's."""


# -- text rendering ---------------------------------------------------------------------------


def describe(mission: str, view: np.ndarray, max_chars: int) -> str:
    """The text of one observation from MiniGrid's symbolic partial view `(7, 7, 3)` (type, colour, state)."""
    from minigrid.core.constants import IDX_TO_COLOR, IDX_TO_OBJECT

    seen = []
    for x, y in zip(*np.nonzero(np.isin(view[:, :, 0], OBJECT_IDS))):
        ahead, side = AHEAD_ROW - int(y), int(x) - AGENT_COLUMN
        where = f"{ahead}" + (f"{'r' if side > 0 else 'l'}{abs(side)}" if side else "")
        name = f"{IDX_TO_COLOR[view[x, y, 1]]} {IDX_TO_OBJECT[view[x, y, 0]]}"
        seen.append((ahead + abs(side), ahead, side, f"{name} {where}"))
    text = f"{mission}:"
    for i, (*_, thing) in enumerate(sorted(seen)):
        part = f"{',' if i else ''} {thing}"
        if len(text) + len(part) > max_chars:
            break
        text += part
    if len(text) > max_chars:
        raise ValueError(f"grid.text_chars={max_chars} cannot hold the mission {mission!r}")
    return text


def _object_ids() -> list[int]:
    from minigrid.core.constants import OBJECT_TO_IDX

    return [OBJECT_TO_IDX[name] for name in ("key", "ball", "box", "door", "goal", "lava")]


OBJECT_IDS = _object_ids()


class GridText(gym.ObservationWrapper):
    """Adds "text" (see `describe`) to MiniGrid's observation; wraps the env below the RGB wrapper."""

    def __init__(self, env: gym.Env, max_chars: int):
        super().__init__(env)
        self.max_chars = max_chars
        text = spaces.Text(max_chars, min_length=1, charset=CHARACTERS)
        self.observation_space = spaces.Dict({**env.observation_space.spaces, "text": text})

    def observation(self, obs: dict) -> dict:
        return {**obs, "text": describe(obs["mission"], obs["image"], self.max_chars)}


def make_env(cfg: GridConfig) -> gym.Env:
    """One env: observations {"image": (H, W, 3) uint8, "text": str} through MiniGrid's wrappers."""
    import minigrid  # noqa: F401  (registers the MiniGrid and BabyAI levels)
    from gymnasium.wrappers import FilterObservation
    from minigrid.wrappers import RGBImgPartialObsWrapper

    env = GridText(gym.make(cfg.env_id), cfg.text_chars)
    return FilterObservation(RGBImgPartialObsWrapper(env, tile_size=cfg.tile_size), ["image", "text"])


def make_vector_env(cfg: GridConfig, n: int) -> gym.vector.SyncVectorEnv:
    """`n` envs stepped together; an env that ends is reset in the same step (its final observation is
    in info["final_obs"]), so the observation returned is always the one to act on."""
    return gym.vector.SyncVectorEnv(
        [lambda: make_env(cfg)] * n, autoreset_mode=gym.vector.AutoresetMode.SAME_STEP, copy=True
    )


# -- the behaviour policy -----------------------------------------------------------------------


class ExpertMix:
    """pi_b(a|s) = (1 - eps) 1[a = bot(s)] + eps / K: the BabyAI bot, replaced by a uniform random
    action with probability eps. The bot is told the action really taken, so it replans after a
    random one (that is what its `replan(action_taken)` is for)."""

    def __init__(self, envs: gym.vector.SyncVectorEnv, actions: int, random_share: float, rng: np.random.Generator):
        self.envs, self.actions, self.eps, self.rng = envs, actions, random_share, rng
        self.bots: list = [None] * envs.num_envs
        self.last: list[int | None] = [None] * envs.num_envs

    def reset(self, i: int) -> None:
        """Env i started a new episode: a fresh bot (it plans from the new mission)."""
        self.bots[i], self.last[i] = None, None

    def expert(self, i: int) -> int:
        from minigrid.utils.baby_ai_bot import BabyAIBot

        if self.bots[i] is None:
            self.bots[i] = BabyAIBot(self.envs.envs[i])
        action = int(self.bots[i].replan(self.last[i]))
        if action >= self.actions:
            raise ValueError(f"the bot chose action {action}; grid.actions={self.actions} does not include it")
        return action

    def act(self) -> tuple[np.ndarray, np.ndarray]:
        """(actions (n,), log pi_b(a|s) (n,)) for the envs' current states."""
        experts = np.array([self.expert(i) for i in range(self.envs.num_envs)])
        explore = self.rng.random(len(experts)) < self.eps
        actions = np.where(explore, self.rng.integers(self.actions, size=len(experts)), experts)
        probs = (1 - self.eps) * (actions == experts) + self.eps / self.actions
        self.last = actions.tolist()
        return actions, np.log(probs).astype(np.float32)


# -- collection and the store ---------------------------------------------------------------------


@dataclass
class Transitions:
    episode: np.ndarray  # (N,) int64, contiguous, in the order the episodes ended
    step: np.ndarray  # (N,) int32, 0 at each episode's first transition
    obs: np.ndarray  # (N, H, W, 3) uint8
    next_obs: np.ndarray  # (N, H, W, 3) uint8 (the final observation at an episode's end)
    action: np.ndarray  # (N,) int64
    reward: np.ndarray  # (N,) float32
    done: np.ndarray  # (N,) bool
    log_prob: np.ndarray  # (N,) float32
    text: list[str]  # the text of each obs

    def __len__(self) -> int:
        return len(self.action)

    def table(self) -> pl.DataFrame:
        """The text table (id, prompt, episode, step): the prompts `label` runs the LM over."""
        return pl.DataFrame(
            {"id": np.arange(len(self)), "prompt": self.text, "episode": self.episode, "step": self.step},
            schema=TEXT_SCHEMA,
        )


ARRAYS = ("episode", "step", "obs", "next_obs", "action", "reward", "done", "log_prob")


def collect(grid: GridConfig, cfg: BehaviourConfig, seed: int) -> Transitions:
    """Run the behaviour policy in `cfg.envs` vectorised envs until `cfg.transitions` are collected."""
    envs = make_vector_env(grid, cfg.envs)
    policy = ExpertMix(envs, grid.actions, cfg.random_share, np.random.default_rng(seed))
    obs, _ = envs.reset(seed=seed)
    open_episodes: list[list[tuple]] = [[] for _ in range(cfg.envs)]
    finished: list[list[tuple]] = []
    total = 0
    with progress(None, "grid transitions", total=cfg.transitions, unit="step") as bar:
        while total < cfg.transitions:
            actions, log_probs = policy.act()
            next_obs, rewards, terminated, truncated, info = envs.step(actions)
            for i in range(cfg.envs):
                done = bool(terminated[i] or truncated[i])
                after = info["final_obs"][i]["image"] if done else next_obs["image"][i]
                row = (obs["image"][i], after, actions[i], rewards[i], done, log_probs[i], obs["text"][i])
                open_episodes[i].append(row)
                if done:
                    finished.append(open_episodes[i])
                    total += len(open_episodes[i])
                    bar.update(len(open_episodes[i]))
                    open_episodes[i] = []
                    policy.reset(i)
            obs = next_obs
    envs.close()
    rows = [row for episode in finished for row in episode]
    images, after, action, reward, done, log_prob, text = zip(*rows)
    lengths = [len(e) for e in finished]
    return Transitions(
        episode=np.repeat(np.arange(len(finished)), lengths).astype(np.int64),
        step=np.concatenate([np.arange(n) for n in lengths]).astype(np.int32),
        obs=np.stack(images),
        next_obs=np.stack(after),
        action=np.array(action, dtype=np.int64),
        reward=np.array(reward, dtype=np.float32),
        done=np.array(done, dtype=bool),
        log_prob=np.array(log_prob, dtype=np.float32),
        text=list(text),
    )


def write_transitions(path: str | Path, data: Transitions, attrs: dict, batch_rows: int = 1024, shard_rows: int = 8192):
    """The transitions store (module doc), atomically; `attrs` (config, seed, ...) go into its attributes."""
    rows = len(data)
    with atomic_output(path) as partial:
        group = zarr.open_group(partial, mode="w", zarr_format=3, attributes={"format": FORMAT, **attrs})
        for name in ARRAYS:
            array = getattr(data, name)
            add_array(group, name, rows_array_metadata(array.shape, array.dtype, batch_rows, shard_rows))[:] = array
        add_array(group, "ids", rows_array_metadata((rows,), "int64", batch_rows, shard_rows))[:] = np.arange(rows)
        group.attrs["complete"] = True


def read_transitions(path: str | Path) -> dict[str, np.ndarray]:
    """Every array of a finished transitions store, in memory."""
    path = Path(path)
    if not (path / "zarr.json").exists():
        raise FileNotFoundError(f"{path} is not a Zarr store (no zarr.json); run `dvc repro grid`")
    group = zarr.open_group(path, mode="r")
    if group.attrs.get("format") != FORMAT or group.attrs.get("complete") is not True:
        raise ValueError(f"{path} is not a complete grid transitions store ({FORMAT})")
    return {name: group[name][:] for name in (*ARRAYS, "ids")}
