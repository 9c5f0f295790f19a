"""Proximal Policy Optimization for any LM policy (Schulman et al., 2017, "Proximal Policy Optimization
Algorithms"), with generalised advantage estimation (Schulman et al., 2016) over the tokens.

The episode is one completion: the action at step t is token t, the reward is the sequence's score
at its last token (0 before it), the episode ends there. Per step of training:

    sample completions from pi_old; r = reward_fn(texts, targets)
    V_t = value head on the state that predicts token t         (policies/value_head.py)
    A_t = GAE(gamma, lambda) over the tokens, R_t = A_t + V_t     (rl/advantages.gae, time-major)
    A_t <- (A_t - mean) / std over the batch's tokens (optional)
    for each epoch, for each minibatch of completions:
        rho_t = pi_theta / pi_old
        L_pi  = -mean_t min(rho_t A_t, clip(rho_t, 1 - e, 1 + e) A_t)                           (eq. 7)
        L_V   = 1/2 mean_t max((V_t - R_t)^2, (V_old_t + clip(V_t - V_old_t, -e_v, e_v) - R_t)^2)
        loss  = L_pi + vf_coef L_V
Tokens after a completion's end-of-sequence are masked out of every mean. The logged `kl` is `approx_kl`, the
k3 estimate of KL(pi_old || pi_theta) over the minibatch's tokens (drawn from pi_old): (rho - 1) - log rho.
"""

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from pydantic import Field

from latentlab.common.config import Config
from latentlab.common.execution import ONE, Execution, Learner, Loss, Term
from latentlab.lm.sampling import SamplingConfig, naming_step
from latentlab.policies.lm_policy import LMPolicy, Rollout
from latentlab.policies.value_head import ValueHead, logprobs_and_values
from latentlab.rl.advantages import gae


class PPOConfig(Config):
    steps: int = Field(gt=0)
    """Rollout batches (each followed by `epochs` passes of minibatch updates)."""
    rollouts_per_step: int = Field(gt=0)
    """Completions sampled per step."""
    max_new_tokens: int = Field(gt=0)
    """Longest completion."""
    temperature: float = Field(1.0, gt=0)
    """Sampling temperature; the loss's log-probs use the same."""
    lr: float = Field(gt=0)
    """AdamW learning rate of the policy and its value head."""
    warmup_steps: int = Field(0, ge=0)
    """Linear warm-up (in optimizer updates)."""
    gamma: float = Field(1.0, ge=0, le=1)
    """Discount per token (1: the sequence's reward reaches every token undiminished)."""
    lam: float = Field(0.95, ge=0, le=1)
    """GAE lambda: 1 Monte-Carlo advantages, 0 one-step TD errors."""
    clip_eps: float = Field(0.2, gt=0, lt=1)
    """Policy ratio clip e."""
    value_clip: float = Field(0.2, gt=0)
    """Value clip e_v: how far V may move from V_old in one batch's updates."""
    vf_coef: float = Field(0.5, ge=0)
    """Weight of the value loss."""
    epochs: int = Field(4, gt=0)
    """Passes over each rollout batch."""
    minibatches: int = Field(4, gt=0)
    """Minibatches per pass (rollouts_per_step must divide evenly)."""
    normalize_advantages: bool = True
    """Whiten advantages over the batch's tokens."""
    max_grad_norm: float = Field(1.0, gt=0)
    """Gradient clipping threshold."""

    @property
    def sampling(self) -> SamplingConfig:
        return SamplingConfig(max_new_tokens=self.max_new_tokens, temperature=self.temperature)


def sequence_rewards(rewards: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`(B,)` sequence rewards -> `(B, T)` token rewards (at each row's last token) and dones (there)."""
    last = mask.sum(1).clamp(min=1) - 1
    token_rewards = torch.zeros(mask.shape, device=rewards.device)
    dones = torch.zeros(mask.shape, device=rewards.device)
    rows = torch.arange(len(rewards), device=rewards.device)
    token_rewards[rows, last] = rewards
    dones[rows, last] = 1.0
    return token_rewards, dones


def approx_kl(log_ratio: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimate of KL(pi_old || pi) from tokens drawn from pi_old: (r - 1) - log r, r = pi / pi_old.

    Unbiased (E_old[r] = 1, E_old[-log r] = KL(pi_old || pi)) and never negative (Schulman, "Approximating KL
    divergence", 2020; CleanRL's `approx_kl`). Not exp(-log r) + log r - 1: that is k3 of KL(pi || pi_old) for
    tokens drawn from pi, and under pi_old's tokens it averages to chi2(pi_old || pi) - KL(pi_old || pi).
    """
    return torch.expm1(log_ratio) - log_ratio


def ppo_policy_loss(
    logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, clip_eps: float
) -> Loss:
    """The clipped surrogate (Schulman et al., 2017, eq. 7), negated, summed over unmasked tokens (a mean over
    "tokens" once the execution layer divides), with its clip fraction and k3 KL as stats."""
    mask = mask.float()
    log_ratio = torch.where(mask.bool(), logprobs - old_logprobs, 0.0)
    ratio = torch.exp(log_ratio)
    surrogate = torch.min(ratio * advantages, torch.clamp(ratio, 1 - clip_eps, 1 + clip_eps) * advantages)
    loss = -(surrogate * mask).sum()
    with torch.no_grad():
        stats = {
            "policy_loss": Term(loss.detach(), "tokens"),
            "clip_fraction": Term((((ratio - 1).abs() > clip_eps).float() * mask).sum(), "tokens"),
            "kl": Term((approx_kl(log_ratio) * mask).sum(), "tokens"),  # KL(pi_old || pi), tokens from pi_old
        }
    return Loss({"policy": Term(loss, "tokens")}, stats)


def ppo_value_loss(
    values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor, clip: float
) -> Term:
    """1/2 sum max((V - R)^2, (V_old + clip(V - V_old, -c, c) - R)^2) over unmasked tokens (a mean over "tokens")."""
    clipped = old_values + torch.clamp(values - old_values, -clip, clip)
    return Term(0.5 * (torch.max((values - returns) ** 2, (clipped - returns) ** 2) * mask.float()).sum(), "tokens")


@dataclass
class _Batch:
    """One shard's rollouts and what the updates need from them (no gradients)."""

    rollout: Rollout
    rewards: torch.Tensor  # (B,)
    old_logprobs: torch.Tensor  # (B, T)
    old_values: torch.Tensor  # (B, T)
    advantages: torch.Tensor  # (B, T), whitened over the global batch in `step`
    returns: torch.Tensor  # (B, T)

    @property
    def mask(self) -> torch.Tensor:
        return self.rollout.completions.mask


class PPOTrainer:
    """PPO steps for any `LMPolicy` and a value head on its model: the same `step(step, prompts, targets)` as GRPO.

    `execution` (latentlab/common/execution.py) cuts each batch's prompts into shards, shard k sampled from
    `generators[k]` of this rank's local shards; GAE runs per rollout, the advantages are whitened over the
    global batch's tokens (all-reduced sums). Each shard's rollouts are cut into `minibatches` by the same
    seeded permutation; global minibatch j is the shards' minibatches j, its loss the mean over its tokens.
    The modules named by `policy.TRAINS` and the value head are the ones wrapped and stepped.
    """

    def __init__(
        self,
        policy: LMPolicy,
        value_head: ValueHead,
        reward_fn: Callable[[list[str], list], list[float]],
        cfg: PPOConfig,
        generators: torch.Generator | list[torch.Generator],
        *,
        execution: Execution = ONE,
    ):
        shards = execution.shards
        if cfg.rollouts_per_step % (cfg.minibatches * shards.count):
            raise ValueError(
                f"rollouts_per_step ({cfg.rollouts_per_step}) must divide into {cfg.minibatches} minibatches "
                f"in each of the {shards.count} shards"
            )
        self.policy, self.value_head, self.reward_fn, self.cfg = policy, value_head.to(policy.device), reward_fn, cfg
        self.generators = generators if isinstance(generators, list) else [generators]
        if len(self.generators) != len(shards.local):
            raise ValueError(f"{len(self.generators)} sampling streams for {len(shards.local)} local shards")
        self.execution = execution
        self.learner = Learner(
            [*((policy, name) for name in policy.TRAINS), (self, "value_head")],
            lambda: [*policy.trainable_parameters(), *self.value_head.parameters()],
            lr=cfg.lr,
            steps=cfg.steps * cfg.epochs * cfg.minibatches,
            warmup_steps=cfg.warmup_steps,
            max_grad_norm=cfg.max_grad_norm,
            execution=execution,
        )

    def sample(self, prompts: list, targets: list, generator: torch.Generator) -> _Batch:
        """Sample one completion per prompt, score it, and estimate advantages by GAE (not yet whitened)."""
        cfg = self.cfg
        self.policy.train(False)
        rollout = self.policy.rollout(prompts, cfg.sampling, generator)
        mask = rollout.completions.mask
        rewards = torch.tensor(self.reward_fn(rollout.texts, targets), dtype=torch.float32, device=mask.device)
        with torch.no_grad():
            old_logprobs, old_values = logprobs_and_values(self.policy, self.value_head, rollout, cfg.temperature)
            token_rewards, dones = sequence_rewards(rewards, mask)
            # time-major for gae; nothing follows the last token (done), so last_value is never used
            advantages = (
                gae(
                    token_rewards.T,
                    old_values.T,
                    dones.T,
                    torch.zeros(len(rewards), device=mask.device),
                    cfg.gamma,
                    cfg.lam,
                ).T
                * mask
            )
        return _Batch(rollout, rewards, old_logprobs, old_values, advantages, advantages + old_values)

    def loss(self, minibatch: "tuple[_Batch, torch.Tensor]") -> Loss:
        """L_pi + vf_coef L_V on one shard's rows of a minibatch."""
        part, rows = minibatch
        cfg, mask = self.cfg, part.mask[rows]
        logprobs, values = logprobs_and_values(self.policy, self.value_head, part.rollout.select(rows), cfg.temperature)
        loss = ppo_policy_loss(logprobs, part.old_logprobs[rows], part.advantages[rows], mask, cfg.clip_eps)
        value = ppo_value_loss(values, part.old_values[rows], part.returns[rows], mask, cfg.value_clip)
        loss.objective["value"] = Term(value.sum, "tokens", weight=cfg.vf_coef)
        loss.stats["value_loss"] = Term(value.sum.detach(), "tokens")
        return loss

    def step(self, step: int, prompts: list, targets: list) -> dict[str, float]:
        cfg, learner = self.cfg, self.learner
        started = time.perf_counter()
        with naming_step(step):  # diverged weights: the sampler's error names this step
            parts = learner.sample(self.sample, prompts, targets, self.generators, "rollouts_per_step")
        n_tokens = learner.all_sum(sum(part.mask.sum() for part in parts))  # the global batch's completion tokens
        if cfg.normalize_advantages:  # whiten over the global batch's tokens: masked means of all-reduced sums
            with torch.no_grad():
                count = n_tokens.clamp(min=1)
                mean = learner.all_sum(sum((part.advantages * part.mask).sum() for part in parts)) / count
                var = learner.all_sum(sum(((part.advantages - mean) ** 2 * part.mask).sum() for part in parts)) / count
                for part in parts:
                    part.advantages = (part.advantages - mean) / (var.sqrt() + 1e-8) * part.mask

        self.policy.train(True)
        stats_sum: dict[str, float] = {}
        updates = 0
        size = len(parts[0].rewards) // cfg.minibatches
        for _ in range(cfg.epochs):
            # every shard cuts its rollouts by the same permutation (one shard: the whole batch's)
            order = torch.randperm(
                len(parts[0].rewards), generator=torch.Generator().manual_seed(step * 1000 + updates)
            )
            for rows in order.split(size):
                rows = rows.to(parts[0].mask.device)
                minibatch = [(part, rows) for part in parts]
                row = learner.update(
                    minibatch, loss=self.loss, counts=lambda m: {"tokens": m[0].mask[m[1]].sum()}, step=step
                )
                learner.step_schedule()
                updates += 1
                for name, value in row.items():
                    stats_sum[name] = stats_sum.get(name, 0.0) + value
        self.policy.train(False)
        rewards = learner.gather(torch.cat([part.rewards for part in parts]))
        value_sum = learner.all_sum(sum((part.old_values * part.mask).sum() for part in parts))
        n_tokens = int(n_tokens)
        seconds = time.perf_counter() - started
        return {
            "reward_mean": rewards.mean().item(),
            "reward_std": rewards.std().item(),
            "value_mean": (value_sum / max(n_tokens, 1)).item(),
            **{name: total / updates for name, total in stats_sum.items()},  # means over the step's updates
            "completion_tokens": n_tokens / len(rewards),
            "tokens_per_s": n_tokens / seconds,
            "seconds_per_step": seconds,
            "lr": learner.lr,
        }
