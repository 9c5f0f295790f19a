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
from dataclasses import dataclass
from typing import Literal

import torch
from pydantic import Field

from latentlab.common.config import Config
from latentlab.common.execution import ONE, Execution, Learner, Loop, Loss, Term, fit
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
) -> Loss:
    """The negated GRPO objective `-J` over `(B, T)` token log-probs, as sums for the execution layer.

    'sequence' (the paper's 1/G sum_i 1/|o_i| sum_t): each completion's token mean, summed over completions,
    a mean over "completions"; 'token' (DAPO's): token sums, a mean over "tokens". Counts: `GRPOTrainer.counts`.
    """
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
    over = "completions" if aggregation == "sequence" else "tokens"

    def total(values: torch.Tensor) -> torch.Tensor:
        values = torch.where(mask, values, 0.0)
        if aggregation == "sequence":
            return (values.sum(1) / mask.sum(1).clamp(min=1)).sum()
        return values.sum()

    clipped = ((ratio < 1 - clip_eps) & (adv < 0)) | ((ratio > 1 + clip_eps) & (adv > 0))
    with torch.no_grad():
        stats = {
            "policy_loss": Term(total(-surrogate), over),
            "kl": Term(total(kl), over),
            "clip_fraction": Term((clipped & mask).sum(), "tokens"),
        }
    return Loss({"grpo": Term(total(per_token), over)}, stats)


def grpo_counts(mask: torch.Tensor) -> dict[str, int | torch.Tensor]:
    """The denominators of `grpo_loss`'s means on a `(B, T)` completion mask: completions, completion tokens,
    and the shard itself (a policy's regularizers are means over a shard's rows: their global value is the mean
    over shards)."""
    return {"completions": mask.shape[0], "tokens": mask.sum(), "shards": 1}


@dataclass
class _Sampled:
    """One shard's rollouts and what the loss needs from them (no gradients)."""

    rollout: Rollout
    rewards: torch.Tensor  # (B,)
    advantages: torch.Tensor  # (B,)
    old_logprobs: torch.Tensor | None  # (B, T) log q (noise, top-p), or pi_old once `step` recomputed it; None:
    # the detached current log-probs (one iteration)
    ref_logprobs: torch.Tensor | None  # (B, T)

    def counts(self) -> dict[str, int | torch.Tensor]:
        return grpo_counts(self.rollout.completions.mask)


class GRPOTrainer:
    """Runs GRPO steps for any `LMPolicy`: sample groups, score, normalise, take clipped steps.

    `execution` (latentlab/common/execution.py) cuts each batch's prompts into shards (a group never spans two),
    shard k sampled from `generators[k]` of this rank's local shards, and normalises the loss by the global
    batch's completions or tokens; the modules named by `policy.TRAINS` are the ones it wraps and steps.
    """

    def __init__(
        self,
        policy: LMPolicy,
        reward_fn: Callable[[list[str], list], list[float]],
        cfg: GRPOConfig,
        generators: torch.Generator | list[torch.Generator],
        *,
        reference: LMPolicy | None = None,
        execution: Execution = ONE,
    ):
        if cfg.beta > 0 and reference is None:
            raise ValueError("GRPOConfig.beta > 0 needs a frozen reference policy")
        self.policy, self.reward_fn, self.cfg = policy, reward_fn, cfg
        self.generators = generators if isinstance(generators, list) else [generators]
        if len(self.generators) != len(execution.shards.local):
            raise ValueError(f"{len(self.generators)} sampling streams for {len(execution.shards.local)} local shards")
        self.execution = execution
        self.ref_policy = reference if cfg.beta > 0 else None
        self.learner = Learner(
            [(policy, name) for name in policy.TRAINS],
            policy.trainable_parameters,
            lr=cfg.lr,
            steps=cfg.steps,
            warmup_steps=cfg.warmup_steps,
            max_grad_norm=cfg.max_grad_norm,
            execution=execution,
        )

    def sample(self, prompts: list[str], targets: list, generator: torch.Generator) -> _Sampled:
        """Sample a group per prompt and score it; advantages are normalised within each group."""
        cfg, G = self.cfg, self.cfg.group_size
        self.policy.train(False)  # sampling is a no-grad, dropout-free pass
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
        ref_logprobs = self.ref_policy.logprobs(rollout, cfg.temperature) if self.ref_policy else None
        return _Sampled(rollout, rewards, advantages, old_logprobs, ref_logprobs)

    def loss(self, part: _Sampled) -> Loss:
        """-J on one shard, plus the policy's regularizers (batch means, each also logged)."""
        cfg = self.cfg
        logprobs = self.policy.logprobs(part.rollout, cfg.temperature)
        old = logprobs.detach() if part.old_logprobs is None else part.old_logprobs
        loss = grpo_loss(
            logprobs, old, part.advantages, part.rollout.completions.mask, cfg.clip_eps, cfg.beta,
            part.ref_logprobs, cfg.loss_aggregation,
        )  # fmt: skip
        for name, value in self.policy.regularizers(part.rollout).items():
            loss.objective[name] = Term(value, "shards")
            loss.stats[name] = Term(value.detach(), "shards")
        return loss

    def step(self, step: int, prompts: list[str], targets: list) -> dict[str, float]:
        """One batch: prompts_per_step prompts, each sampled group_size times; returns the log row."""
        cfg, G, learner = self.cfg, self.cfg.group_size, self.learner
        started = time.perf_counter()
        with naming_step(step):  # diverged weights: the sampler's error names this step
            parts = learner.sample(self.sample, prompts, targets, self.generators, "prompts_per_step")
        self.policy.train(True)
        if cfg.iterations > 1:  # pi_old before the first update, in the loss pass's mode and arithmetic
            for part in parts:
                if part.old_logprobs is None:
                    with learner.scoring():
                        part.old_logprobs = self.policy.logprobs(part.rollout, cfg.temperature)
        for _ in range(cfg.iterations):  # mu gradient steps on the batch; the row is the last one's
            update = learner.update(parts, loss=self.loss, counts=_Sampled.counts, step=step)
        learner.step_schedule()
        self.policy.train(False)

        rewards = learner.gather(torch.cat([part.rewards for part in parts]))
        advantages = learner.gather(torch.cat([part.advantages for part in parts]))
        n_tokens = int(learner.all_sum(sum(part.rollout.completions.mask.sum() for part in parts)))
        seconds = time.perf_counter() - started
        return {
            "reward_mean": rewards.mean().item(),
            "reward_std": rewards.std().item(),
            "zero_std_groups": (rewards.view(-1, G).std(dim=1) < 1e-6).float().mean().item(),
            "advantage_mean": advantages.mean().item(),
            "advantage_std": advantages.std().item(),
            **update,  # loss, policy_loss, kl, clip_fraction, the regularizers, grad_norm
            "completion_tokens": n_tokens / len(rewards),
            "tokens_per_s": n_tokens / seconds,
            "seconds_per_step": seconds,
            "lr": learner.lr,
        }

    def train(self, next_batch: Callable[[], tuple[list[str], list]], loop: Loop) -> None:
        """`cfg.steps` steps on batches from `next_batch`, reported as `loop` says."""
        fit(self.cfg.steps, lambda i: self.step(i, *next_batch()), loop, self.execution, [self.learner])
