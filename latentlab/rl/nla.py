"""NLA training: the supervised phase (actor and/or critic) and the RL phase (GRPO or PPO on the actor,
the critic still learning), with the reconstruction reward and fraction of variance explained.

Targets on the critic's fixed scale (policies/nla_critic.py): t = (v - mu) / sigma, mu the training mean,
sigma the RMS norm of the centred training vectors (mean ||t||^2 = 1 on them); t_hat = critic(text).

    reward(text, v) = f(MSE),  MSE = ||t_hat - t||^2  in [0, inf)   (0 exact; ~1 the mean predictor, t_hat = 0)
    f: neg_mse -MSE | exp exp(-MSE) | inverse 1/(1+MSE) | neg_log -log(MSE + 1e-6)
    an empty explanation is scored as t_hat = 0 (v_hat = the training mean): f(||t||^2), the mean predictor's
    reward on that row. It carries no information, so it earns exactly what knowing nothing earns; an
    explanation earns more only where the critic reads it better than the prior.

Logged per step, over the step's rows (the global batch):
    mse     mean ||t_hat - t||^2
    cosine  mean cos(t_hat, t)
    fve     1 - sum ||t_hat - t||^2 / sum ||t - mean(t)||^2, mean(t) the batch's own (the mean predictor: 0)
"""

import math
from collections.abc import Iterator
from typing import Literal

import numpy as np
import torch
from pydantic import Field

from latentlab.common.batches import epoch_batches
from latentlab.common.config import Config
from latentlab.common.execution import ONE, Execution, Holder, Learner, Loop, Loss, Term, fit
from latentlab.common.tracking import StepLog
from latentlab.policies.nla_actor import NLAActor
from latentlab.policies.nla_critic import NLACritic, fraction_of_variance_explained, reconstruct

RewardKind = Literal["neg_mse", "exp", "inverse", "neg_log"]


def reward_from_mse(mse: torch.Tensor, kind: str) -> torch.Tensor:
    if kind == "neg_mse":
        return -mse
    if kind == "exp":
        return torch.exp(-mse)
    if kind == "inverse":
        return 1 / (1 + mse)
    if kind == "neg_log":
        return -torch.log(mse + 1e-6)
    raise ValueError(f"unknown reward {kind!r}")


class CriticReward:
    """The reward callable of GRPO / PPO; keeps the step's batch so the critic can learn from it.

    A trainer with several local shards calls it once per shard: `begin()` starts a step, and the `last_*`
    fields hold every call since (this rank's rows of the global batch, in shard order).
    """

    def __init__(self, critic: NLACritic, kind: RewardKind):
        self.critic, self.kind = critic, kind
        self.begin()

    def begin(self) -> None:
        self.last_texts: list[str] = []
        self.last_vectors = np.zeros((0, self.critic.dim), dtype=np.float32)
        self.last_mse = torch.zeros(0, device=self.critic.device)
        self.last_cosine = torch.zeros(0, device=self.critic.device)

    def __call__(self, texts: list[str], vectors: list) -> list[float]:
        vectors = np.stack([np.asarray(v) for v in vectors])
        scores = reconstruct(self.critic, list(texts), vectors)
        self.last_vectors = np.concatenate([self.last_vectors, vectors])  # after begin(): this step's shards
        self.last_mse = torch.cat([self.last_mse, scores.mse])
        self.last_cosine = torch.cat([self.last_cosine, scores.cosine])
        self.last_texts += list(texts)
        return reward_from_mse(scores.mse, self.kind).tolist()


class NLASFTConfig(Config):
    train_mode: Literal["actor", "critic", "both"] = "both"
    """What the supervised phase trains: the actor (LM loss on the explanation given the vector), the critic
    (reconstruct the vector from the explanation), or both on the same batches."""
    steps: int = Field(gt=0)
    """Optimizer steps."""
    batch_size: int = Field(gt=0)
    """Rows per step."""
    actor_lr: float = Field(gt=0)
    """AdamW learning rate of the actor (model and injector)."""
    critic_lr: float = Field(gt=0)
    """AdamW learning rate of the critic."""
    warmup_steps: int = Field(0, ge=0)
    """Linear warm-up steps."""
    max_grad_norm: float = Field(1.0, gt=0)
    """Gradient clipping threshold (each model on its own)."""
    log_every: int = Field(10, gt=0)
    """A log row every this many steps."""


def train_sft(
    actor: NLAActor | None,
    critic: NLACritic | None,
    vectors: np.ndarray,
    texts: list[str],
    cfg: NLASFTConfig,
    generator: torch.Generator,
    log: StepLog,
    *,
    execution: Execution = ONE,
) -> list[Learner]:
    """Supervised NLA: the actor learns p(text | vector), the critic learns vector <- text, on the same batches.
    With the `mse` loss the log has the critic's FVE on each training batch (gold text, the batch's own mean).

    Under torchrun (`execution`: one shard per rank) every rank draws the same batch and keeps its contiguous
    shard of it. The actor's loss is the mean over the global batch's explanation tokens, the critic's over its
    rows (the execution layer's normalisation). One process is the reference: 2 processes reproduce it within
    float tolerance.
    """
    shards = execution.shards
    if cfg.batch_size % shards.count:
        raise ValueError(f"nla_sft.batch_size ({cfg.batch_size}) is not divisible by the {shards.count} processes")
    learners = {}  # each model its own optimizer, schedule and clipping
    settings = dict(steps=cfg.steps, warmup_steps=cfg.warmup_steps, max_grad_norm=cfg.max_grad_norm)
    if actor is not None:
        trainable = [(actor, name) for name in actor.TRAINS]
        learners["actor"] = Learner(
            trainable, actor.trainable_parameters, lr=cfg.actor_lr, execution=execution, **settings
        )
        actor.train(True)
    if critic is not None:
        holder = Holder(critic)
        learners["critic"] = Learner(
            [(holder, "module")], lambda: list(critic.parameters()), lr=cfg.critic_lr, execution=execution, **settings
        )
        critic.train(True)

    def actor_loss(rollout) -> Loss:  # summed NLL of the explanations (+ end-of-sequence) given the vectors
        return Loss({"nll": Term(-actor.logprobs(rollout, 1.0).sum(), "tokens")})

    def critic_loss(batch: tuple[list[str], np.ndarray]) -> Loss:
        x, v = batch
        return Loss({"reconstruction": Term(critic.losses(x, v, holder.module).sum(), "rows")})

    batches = epoch_batches(len(texts), cfg.batch_size, generator)

    def step(i: int) -> dict[str, float]:
        batch = next(batches)  # the global batch, the same on every rank
        (rows,) = shards.split(batch, "nla_sft.batch_size")  # the whole batch with one process
        v, x = [vectors[k] for k in rows], [texts[k] for k in rows]
        row = {}
        for name, learner in learners.items():
            if name == "actor":
                rollout = actor.teacher_forced(v, x)
                counts = lambda r: {"tokens": r.completions.mask.sum()}  # noqa: E731
                update = learner.update([rollout], loss=actor_loss, counts=counts, step=i)
            else:
                counts = lambda b: {"rows": len(b[0])}  # noqa: E731
                update = learner.update([(x, np.stack(v))], loss=critic_loss, counts=counts, step=i)
            learner.step_schedule()
            row[f"{name}_grad_norm"], row[f"{name}_loss"] = update["grad_norm"], update["loss"]
        if critic is not None and critic.cfg.loss == "mse":  # the loss is the global batch's mean ||t_hat - t||^2
            row["critic_fve"] = fraction_of_variance_explained(
                torch.tensor(row["critic_loss"]), critic.target(vectors[np.asarray(batch)])
            )
        return row

    fit(cfg.steps, step, Loop(log=log, desc="nla_sft", log_every=cfg.log_every), execution, list(learners.values()))
    for model in (actor, critic):
        if model is not None:
            model.train(False)
    return list(learners.values())  # their `whole()` gathers sharded models to be saved


class CriticUpdates(Config):
    lr: float = Field(gt=0)
    """AdamW learning rate of the critic during RL."""
    updates_per_step: int = Field(1, ge=0)
    """Critic steps on each RL batch's (explanation, vector) pairs (0: the critic is frozen)."""


class CriticTrainer:
    """The critic keeps learning during RL: it reconstructs each batch's vectors from the actor's explanations.

    Under torchrun each rank learns from its rows of the batch (equally many on every rank); the loss is the
    global batch's mean (the execution layer's normalisation).
    """

    def __init__(self, critic: NLACritic, cfg: CriticUpdates, steps: int, *, execution: Execution = ONE):
        self.critic, self.cfg = critic, cfg
        self.holder = Holder(critic)
        self.learner = Learner(
            [(self.holder, "module")] if cfg.updates_per_step else [],  # a frozen critic is never wrapped
            lambda: list(critic.parameters()),
            lr=cfg.lr,
            steps=max(1, steps),
            max_grad_norm=1.0,
            execution=execution,
        )

    def loss(self, batch: tuple[list[str], np.ndarray]) -> Loss:
        texts, vectors = batch
        return Loss({"reconstruction": Term(self.critic.losses(texts, vectors, self.holder.module).sum(), "rows")})

    def update(self, texts: list[str], vectors: np.ndarray, step: int) -> dict[str, float]:
        if self.cfg.updates_per_step == 0:
            return {}
        self.critic.train(True)
        for _ in range(self.cfg.updates_per_step):
            row = self.learner.update(
                [(texts, vectors)], loss=self.loss, counts=lambda b: {"rows": len(b[0])}, step=step
            )
        self.learner.step_schedule()
        self.critic.train(False)
        return {"critic_loss": row["loss"]}


def train_rl(
    trainer,
    reward: CriticReward,
    critic_trainer: CriticTrainer,
    batches: Iterator[list],
    *,
    steps: int,
    loop: Loop,
) -> None:
    """`steps` RL steps (`trainer.step(step, vectors, vectors)`: GRPO or PPO), each followed by critic updates.

    Under torchrun the logged reconstruction metrics are the global batch's (gathered from every rank through
    the critic's learner, which runs as the trainer's does) and the held-out `loop.evaluate` runs on rank 0
    alone (on every rank, in scoring mode, where fsdp shards the actor or the critic)."""
    learner = critic_trainer.learner

    def step(i: int) -> dict[str, float]:
        vectors = next(batches)
        reward.begin()
        row = trainer.step(i, vectors, vectors)
        mse, cosine = learner.gather(reward.last_mse), learner.gather(reward.last_cosine)
        targets = learner.gather(reward.critic.target(reward.last_vectors))  # row for row with `mse`
        texts = reward.last_texts
        # every rank's explanations (equally many on each)
        lengths = learner.gather(torch.tensor([len(t) for t in texts], dtype=torch.float64)).tolist()
        empty = learner.gather(torch.tensor([not t.strip() for t in texts], dtype=torch.float64)).tolist()
        row.update(
            mse=mse.mean().item(),
            cosine=cosine.mean().item(),
            fve=fraction_of_variance_explained(mse, targets),
            explanation_chars=float(np.mean(lengths)),
            empty_fraction=float(np.mean(empty)),
        )
        row.update(critic_trainer.update(texts, reward.last_vectors, i))
        if not math.isfinite(row["mse"]):
            raise ValueError(f"non-finite reconstruction error at step {i}")
        return row

    fit(steps, step, loop, learner.execution, [trainer.learner, learner])
