"""Group Relative Policy Optimization (Shao et al., 2024, "DeepSeekMath", section 4.1).

For each prompt q, sample a group of G completions o_1..o_G from pi_old and score them r_1..r_G.
Outcome advantages are group-normalised and shared by every token of a completion:

    A_i = (r_i - mean(r)) / (std(r) + eps)                    (std scaling optional)

and the policy maximises the clipped surrogate, per token, minus a KL penalty to a frozen reference:

    J = 1/G sum_i 1/|o_i| sum_t [ min(rho_it A_i, clip(rho_it, 1-e, 1+e) A_i) - beta KL_it ]
    rho_it = pi_theta(o_it | q, o_i<t) / pi_old(o_it | q, o_i<t)
    KL_it  = pi_ref/pi_theta - log(pi_ref/pi_theta) - 1         (the unbiased "k3" estimator)

pi_ref/pi_theta is evaluated on tokens drawn from pi_old, which is pi_theta at the batch's first iteration:
k3 then estimates KL(pi_theta || pi_ref) without bias, as in the paper (later iterations reuse the tokens).
Differentiated as a loss term (tokens fixed), its expected gradient is (1 - pi_ref/pi) grad log pi under pi,
i.e. the gradient of KL(pi_ref || pi_theta): a pull toward the reference that agrees with the reverse KL's
to second order near pi_ref, as in the paper.

pi_old, with several iterations, is recomputed by a no-grad teacher-forced pass before the first update (not
the sampler's KV-cached log-probs, which differ in rounding). Exploration noise draws tokens from
q = softmax(logits / T + noise), and top-p < 1 from pi renormalised on the nucleus, instead of pi_old: the ratio is
then pi_theta / q (q given the drawn noise, the sampler's behaviour log-probs), clipped the same way, which
importance-corrects the surrogate's gradient to that of pi's own samples at the first iteration. The KL
term is not reweighted: with noise and beta > 0 it is estimated on q's tokens (biased).

Tokens after a completion's end-of-sequence are masked out of every sum. The same core trains the
full model (`grpo`), an injector on a frozen model (`inject`) and later stages: they differ only in
the policy object they pass in.
"""

import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Literal

import torch
from pydantic import Field

from latentlab.common.config import Config
from latentlab.common.distributed import ONE_PROCESS, Shards, Synced
from latentlab.common.optim import build_optimizer, check_finite
from latentlab.common.runtime import autocast
from latentlab.common.tracking import StepLog, progress
from latentlab.lm.sampling import SamplingConfig, naming_step
from latentlab.policies.lm_policy import LMPolicy, Rollout
from latentlab.rl.advantages import group_advantages


class GRPOSettings(Config):
    """Everything GRPO needs but the learning rate: what stages training different parameters share."""

    steps: int = Field(gt=0)
    """Optimizer updates (each on a fresh batch of rollouts)."""
    prompts_per_step: int = Field(gt=0)
    """Distinct prompts per batch; the batch holds prompts_per_step * group_size completions."""
    group_size: int = Field(8, ge=2)
    """G: completions sampled per prompt."""
    max_new_tokens: int = Field(gt=0)
    """Longest completion."""
    temperature: float = Field(1.0, gt=0)
    """Sampling temperature; log-probs in the loss use the same temperature."""
    top_p: float = Field(1.0, gt=0, le=1)
    """Nucleus sampling threshold. Below 1 tokens come from q = pi renormalised on the nucleus, not pi: the
    ratio's old policy is q (the sampler's behaviour log-probs, log of the renormalised probability), rho =
    pi_theta / q, clipped, as with exploration noise. 1: plain temperature sampling, nothing extra computed."""
    exploration_noise: float = Field(0.0, ge=0)
    """Std of Gaussian noise on the tempered logits while sampling (exploration; not part of pi). Tokens come
    from q = softmax(logits / T + noise), so the ratio's old policy is q: rho = pi_theta / q, clipped (an
    importance correction: the weights pi / q grow heavy-tailed as the noise grows; 2.0 reaches ~1e3)."""
    warmup_steps: int = Field(0, ge=0)
    """Linear warm-up steps."""
    clip_eps: float = Field(0.2, gt=0, lt=1)
    """PPO clip range e."""
    beta: float = Field(0.0, ge=0)
    """Weight of the KL penalty to the frozen reference (0: no reference is kept)."""
    scale_rewards: bool = True
    """Divide advantages by the group's reward std (False: mean-centring only, as in Dr. GRPO)."""
    iterations: int = Field(1, gt=0)
    """mu: gradient steps on each batch of rollouts. 1: pi_old is pi_theta itself, the loss pass's detached
    log-probs (no extra pass, at any precision). Above 1: pi_old's log-probs of the sampled tokens come from a
    no-grad teacher-forced pass before the first step (the loss pass's arithmetic, in chunks: the first ratio is
    exactly 1 in float32), not from the sampler's KV-cached ones, which differ in rounding (in bf16 up to a few
    percent). Tokens drawn from q != pi (top_p < 1, exploration noise) keep q as the old policy at any value."""
    loss_aggregation: Literal["sequence", "token"] = "sequence"
    """'sequence': mean over each completion's tokens, then over completions (the paper);
    'token': one mean over every token of the batch (no bias toward short completions)."""
    max_grad_norm: float = Field(1.0, gt=0)
    """Gradient clipping threshold."""

    @property
    def sampling(self) -> SamplingConfig:
        return SamplingConfig(
            max_new_tokens=self.max_new_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            logit_noise=self.exploration_noise,
        )

    def with_lr(self, lr: float) -> "GRPOConfig":
        """The full, validated config: these settings (and only these) plus a stage's learning rate."""
        return GRPOConfig.model_validate({**self.model_dump(include=set(GRPOSettings.model_fields)), "lr": lr})


class GRPOConfig(GRPOSettings):
    lr: float = Field(gt=0)
    """AdamW learning rate: each stage sets its own (a full model and a small add-on want different ones)."""


def grpo_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_eps: float,
    beta: float = 0.0,
    ref_logprobs: torch.Tensor | None = None,
    aggregation: str = "sequence",
) -> tuple[torch.Tensor, dict[str, float]]:
    """The negated GRPO objective `-J` over `(B, T)` token log-probs; returns (loss, stats)."""
    mask = mask.bool()
    # log-ratios are zeroed (not multiplied by 0) where masked, so whatever sits after an
    # end-of-sequence can never turn into inf * 0 = NaN
    ratio = torch.exp(torch.where(mask, logprobs - old_logprobs, 0.0))
    adv = advantages[:, None]
    surrogate = torch.min(ratio * adv, torch.clamp(ratio, 1 - clip_eps, 1 + clip_eps) * adv)
    per_token = -surrogate
    kl = torch.zeros_like(logprobs)
    if beta > 0:
        if ref_logprobs is None:
            raise ValueError("beta > 0 needs reference log-probs")
        log_ref_ratio = torch.where(mask, ref_logprobs - logprobs, 0.0)
        kl = torch.exp(log_ref_ratio) - log_ref_ratio - 1
        per_token = per_token + beta * kl

    def reduce(values: torch.Tensor) -> torch.Tensor:
        values = torch.where(mask, values, 0.0)
        if aggregation == "sequence":
            return (values.sum(1) / mask.sum(1).clamp(min=1)).mean()
        return values.sum() / mask.sum().clamp(min=1)

    loss = reduce(per_token)
    clipped = ((ratio < 1 - clip_eps) & (adv < 0)) | ((ratio > 1 + clip_eps) & (adv > 0))
    stats = {
        "policy_loss": reduce(-surrogate).item(),
        "kl": reduce(kl).item(),
        "clip_fraction": ((clipped & mask).sum() / mask.sum().clamp(min=1)).item(),
    }
    return loss, stats


@dataclass
class _Sampled:
    """One shard's rollouts and what the loss needs from them (no gradients)."""

    rollout: Rollout
    rewards: torch.Tensor  # (B,)
    advantages: torch.Tensor  # (B,)
    old_logprobs: torch.Tensor | None  # (B, T) log q (noise, top-p), or pi_old once `step` recomputed it; None:
    # the detached current log-probs (one iteration)
    ref_logprobs: torch.Tensor | None  # (B, T)


@dataclass
class _ShardLoss:
    """One shard's loss in the last iteration, and its weights in the global batch's means."""

    loss_weight: float  # its share of the policy loss (rows or tokens, as `loss_aggregation`)
    token_weight: float  # its share of the completion tokens
    total: torch.Tensor  # policy loss + regularizers, as backpropagated on one process
    stats: dict[str, float]  # grpo_loss's
    regularizers: dict[str, torch.Tensor]


class GRPOTrainer:
    """Runs GRPO steps for any `LMPolicy`: sample groups, score, normalise, take clipped steps.

    Sharding (latentlab/common/distributed.py): `shards` cuts each batch's prompts into equal shards (a group
    never spans two), shard k sampled from `generator[k]` of this rank's local shards. Each shard's loss is
    weighted by its share of the global denominator (completions for 'sequence' aggregation, tokens for
    'token'), so the summed (and, across ranks, DDP-averaged) gradient is that of the global batch's loss;
    `synced` is the DDP wrapper of the trainable module. Logged metrics are the global batch's.
    """

    def __init__(
        self,
        policy: LMPolicy,
        reward_fn: Callable[[list[str], list], list[float]],
        cfg: GRPOConfig,
        generator: torch.Generator | list[torch.Generator],
        ref_policy: LMPolicy | None = None,
        shards: Shards = ONE_PROCESS,
        synced: Synced | None = None,
    ):
        if cfg.beta > 0 and ref_policy is None:
            raise ValueError("GRPOConfig.beta > 0 needs a frozen reference policy")
        self.policy, self.reward_fn, self.cfg = policy, reward_fn, cfg
        self.generators = generator if isinstance(generator, list) else [generator]
        if len(self.generators) != len(shards.local):
            raise ValueError(f"{len(self.generators)} sampling streams for {len(shards.local)} local shards")
        self.shards, self.synced = shards, synced
        self.ref_policy = ref_policy if cfg.beta > 0 else None
        self.optimizer, self.schedule = build_optimizer(
            policy.trainable_parameters(), cfg.lr, cfg.steps, cfg.warmup_steps
        )

    def sample(self, prompts: list[str], targets: list, generator: torch.Generator) -> _Sampled:
        """Sample a group per prompt and score it; advantages are normalised within each group."""
        cfg, G = self.cfg, self.cfg.group_size
        self.policy.train(False)  # sampling is a no-grad, dropout-free pass
        with autocast():  # bf16 on a GPU per gpu.precision; nothing on the CPU
            # each prompt's prefix runs once, its KV cache expanded to the group (sampling and scoring alike)
            rollout = self.policy.rollout(prompts, cfg.sampling, generator, group_size=G)
        rewards = torch.tensor(
            self.reward_fn(rollout.texts, [t for t in targets for _ in range(G)]),
            dtype=torch.float32,
            device=self.policy.device,
        )
        advantages = group_advantages(rewards, G, cfg.scale_rewards)
        # pi_old: with one gradient step per batch, pi_old = pi_theta and the detached current log-probs
        # serve; with several, `step` recomputes them in a no-grad teacher-forced pass (`_old_logprobs`).
        # Tokens drawn from q != pi (exploration noise, top_p < 1) come from q: the ratio is pi_theta / q.
        old_logprobs = rollout.completions.behaviour_logprobs
        with torch.no_grad(), autocast():
            ref_logprobs = self.ref_policy.logprobs(rollout, cfg.temperature) if self.ref_policy else None
        return _Sampled(rollout, rewards, advantages, old_logprobs, ref_logprobs)

    def step(self, step: int, prompts: list[str], targets: list) -> dict[str, float]:
        """One batch: prompts_per_step prompts, each sampled group_size times; returns the log row."""
        cfg, G, shards = self.cfg, self.cfg.group_size, self.shards
        started = time.perf_counter()
        with naming_step(step):  # diverged weights: the sampler's error names this step
            parts = shards.map(self.sample, prompts, targets, self.generators, "prompts_per_step")
        masks = [part.rollout.completions.mask for part in parts]
        n_tokens = int(shards.sum(sum(mask.sum() for mask in masks)))  # the global batch's completion tokens
        n_rows = len(prompts) * G

        def weight(mask: torch.Tensor) -> float:  # a shard's share of the global loss (x world, for DDP's mean)
            if cfg.loss_aggregation == "token":
                return shards.weight(int(mask.sum()), n_tokens)
            return shards.weight(mask.shape[0], n_rows)

        self.policy.train(True)
        if cfg.iterations > 1:  # pi_old before the first update, in the loss pass's mode and arithmetic
            for part in parts:
                if part.old_logprobs is None:
                    with torch.no_grad(), autocast():
                        part.old_logprobs = self.policy.logprobs(part.rollout, cfg.temperature)
        for _ in range(cfg.iterations):
            self.optimizer.zero_grad(set_to_none=True)
            shard_losses: list[_ShardLoss] = []
            for k, part in enumerate(parts):
                mask = part.rollout.completions.mask
                with self.synced.forward(sync=k == len(parts) - 1) if self.synced else nullcontext():
                    with autocast():
                        logprobs = self.policy.logprobs(part.rollout, cfg.temperature)
                    old = logprobs.detach() if part.old_logprobs is None else part.old_logprobs
                    loss, stats = grpo_loss(
                        logprobs,
                        old,
                        part.advantages,
                        mask,
                        cfg.clip_eps,
                        cfg.beta,
                        part.ref_logprobs,
                        cfg.loss_aggregation,
                    )
                    regularizers = self.policy.regularizers(part.rollout)
                    total = loss + sum(regularizers.values(), torch.zeros((), device=loss.device))
                    check_finite(total, step)
                    if shards.single:
                        total.backward()
                    else:  # regularizers are batch means: equal weights over the shards
                        reg_weight = shards.weight(1, shards.count)
                        (loss * weight(mask) + (total - loss) * reg_weight).backward()
                shard_losses.append(
                    _ShardLoss(weight(mask), shards.weight(int(mask.sum()), n_tokens), total, stats, regularizers)
                )
            grad_norm = torch.nn.utils.clip_grad_norm_(self.policy.trainable_parameters(), cfg.max_grad_norm)
            self.optimizer.step()
        self.schedule.step()
        self.policy.train(False)

        # the global batch's value of each per-shard mean, weighted as in the loss (latentlab/common/distributed.py)
        loss_w, token_w = [s.loss_weight for s in shard_losses], [s.token_weight for s in shard_losses]
        reg_w = [shards.weight(1, shards.count)] * len(shard_losses)
        device = self.policy.device
        stats = {
            **shards.combine([{k: s.stats[k] for k in ("policy_loss", "kl")} for s in shard_losses], loss_w, device),
            **shards.combine([{"clip_fraction": s.stats["clip_fraction"]} for s in shard_losses], token_w, device),
        }
        regularizers = shards.combine(
            [{n: v.item() for n, v in s.regularizers.items()} for s in shard_losses], reg_w, device
        )
        if shards.single:
            total = shard_losses[0].total.item()
        else:  # the policy loss as weighted in the gradient, plus the regularizers' global means
            policy = [{"loss": s.total.item() - sum(v.item() for v in s.regularizers.values())} for s in shard_losses]
            total = shards.combine(policy, loss_w, device)["loss"] + sum(regularizers.values())
        rewards = shards.gather(torch.cat([part.rewards for part in parts]))
        advantages = shards.gather(torch.cat([part.advantages for part in parts]))
        grouped = rewards.view(-1, G)
        seconds = time.perf_counter() - started
        return {
            "reward_mean": rewards.mean().item(),
            "reward_std": rewards.std().item(),
            "zero_std_groups": (grouped.std(dim=1) < 1e-6).float().mean().item(),
            "advantage_mean": advantages.mean().item(),
            "advantage_std": advantages.std().item(),
            "loss": total,
            **stats,
            **regularizers,
            "grad_norm": float(grad_norm),
            "completion_tokens": n_tokens / n_rows,
            "tokens_per_s": n_tokens / seconds,
            "seconds_per_step": seconds,
            "lr": self.schedule.get_last_lr()[0],
        }

    def train(
        self,
        next_batch: Callable[[], tuple[list[str], list]],
        log: StepLog,
        desc: str = "grpo",
        evaluate: Callable[[], dict[str, float]] | None = None,
        eval_every: int = 0,
    ) -> None:
        """`cfg.steps` steps on batches from `next_batch`; `evaluate` adds held-out metrics every `eval_every`
        (on rank 0 alone under torchrun: the other ranks go on to the next step's collectives and wait there)."""
        bar = progress(range(self.cfg.steps), desc)
        log.bar = bar
        for step in bar:
            row = self.step(step, *next_batch())
            due = eval_every and (step % eval_every == 0 or step == self.cfg.steps - 1)
            if evaluate is not None and due and self.shards.ranks.rank == 0:
                row.update(evaluate())
            log.log(step, **row)
