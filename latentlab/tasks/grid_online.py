"""Online evaluation in the grid world: agents rolled out in N vectorised envs, the hidden-state
policy fed by live extraction (the project's Extractor in process, or `latentlab serve` over HTTP).

Agents: the actor-critic with the hidden state, the same without it (observation only), the
behaviour policy that collected the data (BabyAI bot mixed with random actions) and uniform random.
Every agent meets the same levels: env i is seeded `seed + i` and its k-th episode is the same level
whoever acts (MiniGrid draws levels at reset). Each env contributes its first `episodes / envs`
episodes, so short episodes are not over-counted.

Live extraction: the text of env i's observation goes through the LM at the first step of an
episode and then every `skip_n` steps; in between the last state is reused (the reference's skip-n).
"""

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from pydantic import Field

from latentlab.common.config import Config
from latentlab.common.tracking import progress
from latentlab.hidden.attrs import StoreAttrs
from latentlab.hidden.extract import Extractor
from latentlab.policies.actor_critic import ActorCritic
from latentlab.tasks.grid import ExpertMix, GridConfig, make_vector_env


class OnlineConfig(Config):
    envs: int = Field(16, gt=0)
    """Vectorised environments stepped together (and texts extracted together)."""
    episodes: int = Field(256, gt=0)
    """Episodes per agent (rounded up to a multiple of envs)."""
    layer: int = -1
    """Hidden state fed to the policy (output_hidden_states numbering; one of label.layers)."""
    tokens: int | None = Field(None, gt=0)
    """Live extraction: 1 prompt only, N > 1 generate N tokens first; None: as the training states were labelled."""
    skip_n: int = Field(1, gt=0)
    """Extract every skip_n steps of an episode (and at its first step), reusing the last state between."""
    greedy: bool = True
    """Act by the most likely action (false: sample from pi)."""
    server: str | None = None
    """URL of a `latentlab serve` to extract through (null: the Extractor in this process)."""


class TextEncoder:
    """texts -> `(B, H)` pooled states of one layer, by the in-process Extractor."""

    def __init__(self, extractor: Extractor, layer: int, generator: torch.Generator | None):
        self.extractor, self.generator = extractor, generator
        self.index = extractor.cfg.layers.index(layer)

    def __call__(self, texts: list[str]) -> np.ndarray:
        return self.extractor(texts, self.generator).pooled[:, self.index].numpy()


def make_encoder(cfg: OnlineConfig, model_dir, labelled: StoreAttrs, device, seed: int) -> Callable:
    """texts -> `(B, H)` of layer `cfg.layer`: through the server at `cfg.server`, or an Extractor over
    `model_dir` set up exactly as the training states were labelled (`labelled`: the store's attributes;
    pooling, sampling, dtype and prompt format included), with `cfg.tokens` instead of the labelled
    tokens when given."""
    if cfg.server is not None:
        from latentlab.hidden.client import HiddenClient

        client = HiddenClient(cfg.server, cfg.layer)
        served = client.info.get("pooling", "mean")  # servers from before the option pooled by mean
        if served != labelled.pooling:
            raise ValueError(
                f"the server at {cfg.server} pools by {served}, the training states by {labelled.pooling}: start "
                f"it with --pooling {labelled.pooling}"
            )
        return client
    from latentlab.lm.modeling import load_lm

    extract = labelled.extract_config(layers=[cfg.layer], tokens=cfg.tokens or labelled.tokens)
    model, tokenizer = load_lm(model_dir, device, dtype=getattr(torch, extract.dtype))
    extractor = Extractor(model, tokenizer, extract, labelled.prompt_format)
    return TextEncoder(extractor, cfg.layer, torch.Generator(device=device).manual_seed(seed))


class PolicyAgent:
    """The actor-critic; with an encoder, each env's hidden state is extracted live (every skip_n steps)."""

    def __init__(self, policy: ActorCritic, n: int, encoder: Callable | None, cfg: OnlineConfig, seed: int):
        self.policy, self.encoder, self.cfg = policy, encoder, cfg
        self.device = next(policy.parameters()).device
        self.hidden = np.zeros((n, policy.cfg.hidden_size), dtype=np.float32) if encoder else None
        self.age = np.zeros(n, dtype=np.int64)  # steps since env i's state was extracted
        self.generator = torch.Generator(device=self.device).manual_seed(seed)
        self.extracted = 0

    def act(self, obs: dict, starts: np.ndarray) -> np.ndarray:
        hidden = None
        if self.encoder is not None:
            stale = starts | (self.age >= self.cfg.skip_n)
            if stale.any():
                rows = np.flatnonzero(stale)
                self.hidden[rows] = self.encoder([obs["text"][i] for i in rows])
                self.age[rows] = 0
                self.extracted += len(rows)
            self.age += 1
            hidden = torch.from_numpy(self.hidden).to(self.device)
        image = torch.from_numpy(obs["image"]).to(self.device)
        return self.policy.act(image, hidden, self.cfg.greedy, self.generator).cpu().numpy()


class BehaviourAgent:
    """The data's behaviour policy (ExpertMix) acting in the evaluation envs."""

    def __init__(self, envs, actions: int, random_share: float, seed: int):
        self.mix = ExpertMix(envs, actions, random_share, np.random.default_rng(seed))

    def act(self, obs: dict, starts: np.ndarray) -> np.ndarray:
        for i in np.flatnonzero(starts):
            self.mix.reset(i)
        return self.mix.act()[0]


class RandomAgent:
    def __init__(self, actions: int, seed: int):
        self.actions, self.rng = actions, np.random.default_rng(seed)

    def act(self, obs: dict, starts: np.ndarray) -> np.ndarray:
        return self.rng.integers(self.actions, size=len(starts))


@dataclass
class Episodes:
    returns: np.ndarray  # (E,) undiscounted return of each episode
    success: np.ndarray  # (E,) bool: the mission was done (reward > 0)
    lengths: np.ndarray  # (E,) steps
    env_steps: int  # every step taken, counted or not
    seconds: float  # wall time of the rollout

    def summary(self) -> dict:
        """Mean return with a normal 95% interval, success rate with a Wilson 95% interval, speed."""
        n, z = len(self.returns), 1.96
        mean, half = float(self.returns.mean()), z * float(self.returns.std(ddof=1)) / math.sqrt(n)
        p = float(self.success.mean())
        centre, spread = (p + z * z / (2 * n)) / (1 + z * z / n), z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
        spread /= 1 + z * z / n
        return {
            "episodes": n,
            "return_mean": mean,
            "return_ci95": [mean - half, mean + half],
            "success_rate": p,
            "success_ci95": [centre - spread, centre + spread],
            "length_mean": float(self.lengths.mean()),
            "env_steps_per_s": self.env_steps / self.seconds,
        }


def paired(a: Episodes, b: Episodes) -> dict:
    """Mean per-episode difference a - b with a normal 95% interval: both played the same levels in
    the same order (env i's k-th episode), so the pairing removes the levels' spread."""
    diff = a.returns - b.returns
    mean, half = float(diff.mean()), 1.96 * float(diff.std(ddof=1)) / math.sqrt(len(diff))
    wins = a.success.astype(int) - b.success.astype(int)
    return {
        "return_diff": mean,
        "return_diff_ci95": [mean - half, mean + half],
        "success_diff": float(wins.mean()),
    }


def rollout(grid: GridConfig, make_agent: Callable, cfg: OnlineConfig, seed: int, desc: str = "rollout") -> Episodes:
    """Run `make_agent(envs)` in `cfg.envs` envs until each has finished its share of `cfg.episodes`."""
    envs = make_vector_env(grid, cfg.envs)
    agent = make_agent(envs)
    quota = -(-cfg.episodes // cfg.envs)
    obs, _ = envs.reset(seed=seed)
    starts = np.ones(cfg.envs, dtype=bool)
    running, length = np.zeros(cfg.envs), np.zeros(cfg.envs, dtype=np.int64)
    finished: list[list[tuple]] = [[] for _ in range(cfg.envs)]
    env_steps, started = 0, time.perf_counter()
    with progress(None, desc, total=quota * cfg.envs, unit="episode") as bar:
        while min(map(len, finished)) < quota:
            actions = agent.act(obs, starts)
            obs, rewards, terminated, truncated, _ = envs.step(actions)
            env_steps += cfg.envs
            running += rewards
            length += 1
            starts = terminated | truncated
            for i in np.flatnonzero(starts):
                if len(finished[i]) < quota:
                    finished[i].append((running[i], rewards[i] > 0, length[i]))
                    bar.update(1)
                running[i], length[i] = 0.0, 0
    seconds = time.perf_counter() - started
    envs.close()
    returns, success, lengths = (np.array(x) for x in zip(*[e for env in finished for e in env]))
    return Episodes(returns.astype(np.float64), success.astype(bool), lengths, env_steps, seconds)
