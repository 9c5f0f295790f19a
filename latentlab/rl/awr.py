"""Advantage-weighted regression for discrete actions, offline (Peng, Kumar, Zhang and Levine 2019,
"Advantage-Weighted Regression: Simple and Scalable Off-Policy Reinforcement Learning", Alg. 1).

Each iteration, on the whole fixed dataset of transitions (episodes contiguous, in order):
    V(s_t)          the critic's values, no gradient
    A_t             GAE(lambda) of the rewards against V (latentlab.rl.advantages.gae)
    R^lambda_t      = A_t + V(s_t): the TD(lambda) return, the critic's regression target
    A_hat_t         = (A_t - mean A) / (std A + eps): normalised over the dataset
    w_t             = min(exp(A_hat_t / beta), w_max)
then `steps_per_iteration` minibatch steps of
    loss = - mean_b w_b log pi(a_b | s_b)  +  value_coef * mean_b (V(s_b) - R^lambda_b)^2 / 2
Recomputing A and R^lambda from the improved V each iteration is the paper's alternation of
value and policy fitting; the weights are constants of the policy step (no gradient through w).
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from pydantic import Field

from latentlab.common.batches import epoch_batches
from latentlab.common.config import Config
from latentlab.common.execution import ONE, Execution, Holder, Learner, Loss, Term
from latentlab.common.tracking import StepLog, progress
from latentlab.rl.advantages import gae


class AWRConfig(Config):
    iterations: int = Field(8, gt=0)
    """Rounds of (recompute V, A, R^lambda and weights; then fit) over the dataset."""
    steps_per_iteration: int = Field(100, gt=0)
    """Minibatch gradient steps per round."""
    batch_size: int = Field(256, gt=0)
    """Transitions per gradient step."""
    lr: float = Field(1.0e-3, gt=0)
    """AdamW learning rate (linear warm-up, cosine decay to 10%)."""
    gamma: float = Field(0.99, ge=0, le=1)
    """Discount."""
    lam: float = Field(0.95, ge=0, le=1)
    """TD(lambda) / GAE lambda: 1 Monte-Carlo returns, 0 one-step TD targets."""
    beta: float = Field(1.0, gt=0)
    """Temperature of the weights exp(A_hat / beta): lower is greedier."""
    w_max: float = Field(20.0, gt=0)
    """Clip of the weights, so a few large advantages cannot dominate a batch."""
    value_coef: float = Field(0.5, ge=0)
    """Weight of the critic's regression loss."""
    max_grad_norm: float = Field(1.0, gt=0)
    """Gradient clipping threshold (global L2 norm)."""


def td_lambda_returns(
    rewards: torch.Tensor, values: torch.Tensor, dones: torch.Tensor, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, R^lambda) over a flat `(N,)` sequence of whole episodes: R^lambda = A + V. The last
    transition must end an episode, so nothing is bootstrapped after it."""
    if not bool(dones[-1]):
        raise ValueError("the transitions must end with a finished episode (done[-1] is false)")
    advantages = gae(rewards, values, dones, torch.zeros(()), gamma, lam)
    return advantages, advantages + values


def awr_weights(advantages: torch.Tensor, beta: float, w_max: float, eps: float = 1e-8) -> torch.Tensor:
    """w = min(exp(A_hat / beta), w_max) with A_hat the advantages normalised to mean 0, std 1."""
    normalised = (advantages - advantages.mean()) / (advantages.std() + eps)
    return torch.exp(normalised / beta).clamp(max=w_max)


@dataclass
class Batch:
    """The dataset in memory: inputs, actions, rewards, dones (flat, episodes contiguous)."""

    image: torch.Tensor  # (N, H, W, 3) uint8
    hidden: torch.Tensor | None  # (N, hidden_size) float32
    action: torch.Tensor  # (N,) int64
    reward: torch.Tensor  # (N,) float32
    done: torch.Tensor  # (N,) bool

    def inputs(self, rows) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self.image[rows], None if self.hidden is None else self.hidden[rows]


@torch.no_grad()
def _values(model, data: Batch, chunk: int = 2048) -> torch.Tensor:
    return torch.cat([model(*data.inputs(slice(i, i + chunk)))[1] for i in range(0, len(data.action), chunk)])


def train_awr(
    model: torch.nn.Module,
    data: Batch,
    cfg: AWRConfig,
    generator: torch.Generator,
    log: StepLog,
    desc: str = "awr",
    *,
    execution: Execution = ONE,
) -> Learner:
    """Fit `model` ((image, hidden) -> (logits, value)) to `data` by AWR (module doc), in place.

    Under torchrun (`execution`: one shard per rank) every rank computes V, A and the weights on the whole
    dataset (the same on every rank: the weights are synchronised by the wrapper), draws the same minibatch and
    keeps its contiguous shard of it; both losses are means over the global minibatch's rows (the execution
    layer's normalisation). One process is the reference: 2 processes reproduce it within float tolerance.
    """
    shards = execution.shards
    if cfg.batch_size % shards.count:
        raise ValueError(f"policy.awr.batch_size ({cfg.batch_size}) is not divisible by the {shards.count} processes")
    net = Holder(model)
    steps = cfg.iterations * cfg.steps_per_iteration
    learner = Learner(
        [(net, "module")],
        lambda: list(model.parameters()),
        lr=cfg.lr,
        steps=steps,
        warmup_steps=cfg.steps_per_iteration // 4,
        max_grad_norm=cfg.max_grad_norm,
        execution=execution,
    )

    def loss(rows: torch.Tensor) -> Loss:
        logits, value = net.module(*data.inputs(rows))
        log_pi = F.log_softmax(logits, 1).gather(1, data.action[rows, None]).squeeze(1)  # (B,)
        w = weights[rows]
        value_loss = 0.5 * (value - returns[rows]).pow(2).sum()
        with torch.no_grad():
            stats = {
                "policy_loss": Term(-(w * log_pi).sum(), "rows"),
                "value_loss": Term(value_loss.detach(), "rows"),
                "weight_mean": Term(w.sum(), "rows"),
                "weight_clipped": Term((w >= cfg.w_max).float().sum(), "rows"),
            }
        objective = {"policy": Term(-(w * log_pi).sum(), "rows"), "value": Term(value_loss, "rows", cfg.value_coef)}
        return Loss(objective, stats)

    batches = epoch_batches(len(data.action), cfg.batch_size, generator)
    step = 0
    with progress(None, desc, total=steps, unit="step") as bar:
        for _ in range(cfg.iterations):
            model.eval()
            values = _values(model, data)  # (N,)
            advantages, returns = td_lambda_returns(data.reward, values, data.done, cfg.gamma, cfg.lam)
            weights = awr_weights(advantages, cfg.beta, cfg.w_max)
            model.train()
            for _ in range(cfg.steps_per_iteration):
                (rows,) = shards.split(torch.tensor(next(batches)), "policy.awr.batch_size")  # all: one process
                row = learner.update([rows], loss=loss, counts=lambda r: {"rows": len(r)}, step=step)
                learner.step_schedule()
                step += 1
                bar.update(1)
                if step % cfg.steps_per_iteration == 0 or step == 1:
                    row.pop("grad_norm")
                    log.log(step, **row, return_mean=returns.mean().item())
    model.eval()
    return learner  # its `whole()` gathers a sharded model to be saved
