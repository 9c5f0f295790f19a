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
from collections.abc import Callable, Iterator
from typing import Literal

import numpy as np
import torch
from pydantic import Field

from latentlab.common.batches import epoch_batches
from latentlab.common.config import Config
from latentlab.common.distributed import ONE_PROCESS, Shards, data_parallel
from latentlab.common.optim import build_optimizer, check_finite
from latentlab.common.tracking import StepLog, progress
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
    shards: Shards = ONE_PROCESS,
) -> None:
    """Supervised NLA: the actor learns p(text | vector), the critic learns vector <- text, on the same batches.
    With the `mse` loss the log has the critic's FVE on each training batch (gold text, the batch's own mean).

    Under torchrun (`shards`: one per rank) every rank draws the same batch and keeps its contiguous shard of
    it; the actor (model and injection map) and the critic train under DDP. The actor's loss is the mean over
    the global batch's tokens (each rank divides its summed NLL by the all-reduced token count, times the
    world size for DDP's average); the critic's is a mean over rows, equally many on every rank. One process
    is the reference: 2 processes reproduce it within float tolerance.
    """
    if cfg.batch_size % shards.count:
        raise ValueError(f"nla_sft.batch_size ({cfg.batch_size}) is not divisible by the {shards.count} processes")
    parts, nets = {}, {}
    if actor is not None:
        parts["actor"] = (
            actor.trainable_parameters(),
            *build_optimizer(actor.trainable_parameters(), cfg.actor_lr, cfg.steps, cfg.warmup_steps),
        )
        nets["actor"] = actor.synced(shards.ranks)
        actor.train(True)
    if critic is not None:
        params = list(critic.parameters())
        parts["critic"] = (params, *build_optimizer(params, cfg.critic_lr, cfg.steps, cfg.warmup_steps))
        nets["critic"] = data_parallel(critic, shards.ranks)  # the critic itself with one process
        critic.train(True)
    bar = progress(range(cfg.steps), "nla_sft")
    log.bar = bar
    batches = epoch_batches(len(texts), cfg.batch_size, generator)
    for step in bar:
        batch = next(batches)  # the global batch, the same on every rank
        (rows,) = shards.split(batch, "nla_sft.batch_size")  # the whole batch with one process
        v, x = [vectors[i] for i in rows], [texts[i] for i in rows]
        losses = {}  # name: (the loss to differentiate, the global batch's loss to log)
        if actor is not None:
            if shards.single:
                loss = actor.sft_loss(v, x)
                losses["actor"] = (loss, loss)
            else:
                with nets["actor"].forward():
                    total, count = actor.sft_nll(v, x)
                count = shards.sum(count).clamp(min=1)  # the global batch's explanation tokens
                losses["actor"] = (total / count * shards.ranks.world, shards.sum(total.detach()) / count)
        if critic is not None:
            loss = critic.loss(x, np.stack(v), nets["critic"])
            losses["critic"] = (loss, shards.mean(loss.detach()))
        row = {}
        for name, (loss, global_loss) in losses.items():
            params, optimizer, schedule = parts[name]
            check_finite(loss, step, f"{name} loss")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            row[f"{name}_grad_norm"] = float(torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm))
            optimizer.step()
            schedule.step()
            row[f"{name}_loss"] = global_loss.item()
        if "critic" in losses and critic.cfg.loss == "mse":  # the loss is the global batch's mean ||t_hat - t||^2
            row["critic_fve"] = fraction_of_variance_explained(
                torch.tensor(row["critic_loss"]), critic.target(vectors[np.asarray(batch)])
            )
        if step % cfg.log_every == 0 or step == cfg.steps - 1:
            log.log(step, **row)
    for model in (actor, critic):
        if model is not None:
            model.train(False)


class CriticUpdates(Config):
    lr: float = Field(gt=0)
    """AdamW learning rate of the critic during RL."""
    updates_per_step: int = Field(1, ge=0)
    """Critic steps on each RL batch's (explanation, vector) pairs (0: the critic is frozen)."""


class CriticTrainer:
    """The critic keeps learning during RL: it reconstructs each batch's vectors from the actor's explanations.

    Under torchrun each rank learns from its rows of the batch (equally many on every rank): the mean loss of
    its rows, averaged across ranks by DDP, is the global batch's mean loss.
    """

    def __init__(self, critic: NLACritic, cfg: CriticUpdates, steps: int, shards: Shards = ONE_PROCESS):
        self.critic, self.cfg, self.shards = critic, cfg, shards
        self.optimizer, self.schedule = build_optimizer(list(critic.parameters()), cfg.lr, max(1, steps))
        self.net = data_parallel(critic, shards.ranks) if cfg.updates_per_step else critic  # DDP's or itself

    def update(self, texts: list[str], vectors: np.ndarray, step: int) -> dict[str, float]:
        if self.cfg.updates_per_step == 0:
            return {}
        critic = self.critic
        critic.train(True)
        for _ in range(self.cfg.updates_per_step):
            loss = critic.loss(texts, vectors, self.net)
            check_finite(loss, step, "critic loss")
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(critic.parameters(), 1.0)
            self.optimizer.step()
        self.schedule.step()
        critic.train(False)
        return {"critic_loss": self.shards.mean(loss.detach()).item()}


def train_rl(
    trainer,
    reward: CriticReward,
    critic_trainer: CriticTrainer,
    batches: Iterator[list],
    steps: int,
    log: StepLog,
    desc: str,
    evaluate: Callable[[], dict[str, float]] | None = None,
    eval_every: int = 0,
    shards: Shards = ONE_PROCESS,
) -> None:
    """`steps` RL steps (`trainer.step(step, vectors, vectors)`: GRPO or PPO), each followed by critic updates.

    Under torchrun the logged reconstruction metrics are the global batch's (gathered from every rank) and the
    held-out `evaluate` runs on rank 0 alone (the others wait in the next step's collectives)."""
    bar = progress(range(steps), desc)
    log.bar = bar
    for step in bar:
        vectors = next(batches)
        reward.begin()
        row = trainer.step(step, vectors, vectors)
        mse, cosine = shards.gather(reward.last_mse), shards.gather(reward.last_cosine)
        targets = shards.gather(reward.critic.target(reward.last_vectors))  # row for row with `mse`
        texts = reward.last_texts
        lengths, empty = [len(t) for t in texts], [not t.strip() for t in texts]
        if shards.ranks.world > 1:  # every rank's explanations (equally many on each)
            lengths = shards.gather(torch.tensor(lengths, dtype=torch.float64)).tolist()
            empty = shards.gather(torch.tensor(empty, dtype=torch.float64)).tolist()
        row.update(
            mse=mse.mean().item(),
            cosine=cosine.mean().item(),
            fve=fraction_of_variance_explained(mse, targets),
            explanation_chars=float(np.mean(lengths)),
            empty_fraction=float(np.mean(empty)),
        )
        row.update(critic_trainer.update(texts, reward.last_vectors, step))
        due = eval_every and (step % eval_every == 0 or step == steps - 1)
        if evaluate is not None and due and shards.ranks.rank == 0:
            row.update(evaluate())
        if not math.isfinite(row["mse"]):
            raise ValueError(f"non-finite reconstruction error at step {step}")
        log.log(step, **row)
