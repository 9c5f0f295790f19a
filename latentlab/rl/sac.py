"""Soft Actor-Critic (Haarnoja et al. 2018, "Soft Actor-Critic: Off-Policy Maximum Entropy Deep RL with a
Stochastic Actor"), with automatic entropy tuning from Haarnoja et al. 2018, "Soft Actor-Critic Algorithms
and Applications", section 5. Written CleanRL-style (sac_continuous_action.py), top to bottom.

Actions live in [-1, 1]^A. The pieces:
- twin critics Q1, Q2 and their Polyak-averaged targets:  theta' <- tau * theta + (1 - tau) * theta'
- soft Bellman target:  y = r + gamma * (1 - done) * (min_i Q'_i(s', a') - alpha * log pi(a'|s')),  a' ~ pi(.|s')
  with a **bandit mode**: gamma = 0 means y = r, no next-state pass at all. The surgeon uses it: one
  edit is one decision whose whole consequence is the reward measured for it (the edit is evaluated
  and, unless committed, undone), so there is no next state to bootstrap from. Bootstrapping such
  one-step transitions with gamma = 0.99 (what the reference code did) asks Q for a geometric sum of
  rewards that never arrive: Q drifts toward r / (1 - gamma) and its loss explodes.
- actor: u ~ N(mu(s), sigma(s)), a = tanh(u); change of variables (appendix C of the first paper):
      log pi(a|s) = log N(u; mu, sigma) - sum_j log(1 - tanh(u_j)^2)
  computed as log(1 - tanh(u)^2) = 2 (log 2 - u - softplus(-2u)), stable for large |u|.
  Actor loss:  E_s E_a~pi [ alpha * log pi(a|s) - min_i Q_i(s, a) ].
- temperature: J(alpha) = E_a~pi [ -alpha * (log pi(a|s) + H_target) ], H_target = -|A| by default;
  optimised through log alpha, so alpha rises when the policy's entropy falls below the target.
- a replay buffer; `act` returns uniform random actions until `learning_starts` transitions are stored.
"""

import math

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from latentlab.common.config import Config


class SACConfig(Config):
    hidden: int = Field(64, gt=0)
    """Width of the two hidden layers of the actor and of each critic."""
    q_lr: float = Field(1e-3, gt=0)
    """Adam learning rate of the critics."""
    policy_lr: float = Field(3e-4, gt=0)
    """Adam learning rate of the actor."""
    alpha_lr: float = Field(1e-3, gt=0)
    """Adam learning rate of log alpha (automatic entropy tuning)."""
    gamma: float = Field(0.0, ge=0, lt=1)
    """Discount. 0 is the bandit mode: the critic's target is the reward itself, nothing is bootstrapped."""
    tau: float = Field(0.005, gt=0, le=1)
    """Polyak coefficient of the target critics (1: copy). Unused in the bandit mode's targets."""
    batch_size: int = Field(64, gt=0)
    """Transitions per gradient step."""
    buffer_size: int = Field(10_000, gt=0)
    """Replay capacity (oldest transitions are overwritten)."""
    learning_starts: int = Field(32, ge=0)
    """Uniform random actions and no updates until this many transitions are stored."""
    initial_alpha: float = Field(0.1, gt=0)
    """Entropy temperature at the start."""
    autotune: bool = True
    """Tune alpha toward `target_entropy`; False keeps `initial_alpha`."""
    target_entropy: float | None = None
    """Entropy target H (null: -|A|, as in the applications paper)."""


LOG_STD_MIN, LOG_STD_MAX = -5.0, 2.0


def mlp(inputs: int, outputs: int, hidden: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(inputs, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, outputs)
    )


class QNetwork(nn.Module):
    def __init__(self, obs_dim: int, action_dim: int, hidden: int):
        super().__init__()
        self.net = mlp(obs_dim + action_dim, 1, hidden)

    def forward(self, obs: torch.Tensor, action: torch.Tensor) -> torch.Tensor:
        return self.net(torch.cat([obs, action], -1)).squeeze(-1)  # (B,)


def log_one_minus_tanh_squared(u: torch.Tensor) -> torch.Tensor:
    """log(1 - tanh(u)^2) = 2 (log 2 - u - softplus(-2u)), without cancellation at large |u|."""
    return 2.0 * (math.log(2.0) - u - F.softplus(-2.0 * u))


class Actor(nn.Module):
    """Tanh-squashed Gaussian policy."""

    def __init__(self, obs_dim: int, action_dim: int, hidden: int):
        super().__init__()
        self.trunk = mlp(obs_dim, 2 * action_dim, hidden)

    def distribution(self, obs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mean, log_std = self.trunk(obs).chunk(2, dim=-1)
        # squash log_std smoothly into [LOG_STD_MIN, LOG_STD_MAX] (CleanRL)
        log_std = LOG_STD_MIN + 0.5 * (LOG_STD_MAX - LOG_STD_MIN) * (torch.tanh(log_std) + 1)
        return mean, log_std

    def sample(
        self, obs: torch.Tensor, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(a, log pi(a|s), tanh(mean)): a reparameterised sample `(B, A)`, its log-prob `(B,)`, the mode."""
        mean, log_std = self.distribution(obs)
        std = log_std.exp()
        u = mean + std * torch.randn(mean.shape, generator=generator, device=mean.device)  # reparameterisation
        gaussian = (-0.5 * ((u - mean) / std) ** 2 - log_std - 0.5 * math.log(2 * math.pi)).sum(-1)
        log_prob = gaussian - log_one_minus_tanh_squared(u).sum(-1)
        return torch.tanh(u), log_prob, torch.tanh(mean)


class ReplayBuffer:
    """A ring buffer of (obs, action, reward, next_obs, done) tensors."""

    def __init__(self, capacity: int, obs_dim: int, action_dim: int):
        self.obs = torch.zeros(capacity, obs_dim)
        self.actions = torch.zeros(capacity, action_dim)
        self.rewards = torch.zeros(capacity)
        self.next_obs = torch.zeros(capacity, obs_dim)
        self.dones = torch.zeros(capacity)
        self.capacity, self.size, self.position = capacity, 0, 0

    def add(self, obs, action, reward: float, next_obs, done: bool) -> None:
        i = self.position
        self.obs[i], self.actions[i], self.next_obs[i] = obs, action, next_obs
        self.rewards[i], self.dones[i] = reward, float(done)
        self.position = (i + 1) % self.capacity
        self.size = min(self.size + 1, self.capacity)

    def sample(self, batch_size: int, generator: torch.Generator) -> tuple[torch.Tensor, ...]:
        rows = torch.randint(0, self.size, (batch_size,), generator=generator)
        return self.obs[rows], self.actions[rows], self.rewards[rows], self.next_obs[rows], self.dones[rows]


@torch.no_grad()
def polyak_update(source: nn.Module, target: nn.Module, tau: float) -> None:
    """theta' <- tau * theta + (1 - tau) * theta'."""
    for p, p_target in zip(source.parameters(), target.parameters(), strict=True):
        p_target.mul_(1 - tau).add_(tau * p)


class SAC:
    """The agent: `act` picks an action, `observe` stores a transition and takes one gradient step."""

    def __init__(self, obs_dim: int, action_dim: int, cfg: SACConfig, generator: torch.Generator):
        self.cfg, self.obs_dim, self.action_dim, self.generator = cfg, obs_dim, action_dim, generator
        self.actor = Actor(obs_dim, action_dim, cfg.hidden)
        self.q1, self.q2 = QNetwork(obs_dim, action_dim, cfg.hidden), QNetwork(obs_dim, action_dim, cfg.hidden)
        self.q1_target, self.q2_target = (
            QNetwork(obs_dim, action_dim, cfg.hidden),
            QNetwork(obs_dim, action_dim, cfg.hidden),
        )
        self.q1_target.load_state_dict(self.q1.state_dict())
        self.q2_target.load_state_dict(self.q2.state_dict())
        self.q_optimizer = torch.optim.Adam([*self.q1.parameters(), *self.q2.parameters()], lr=cfg.q_lr)
        self.actor_optimizer = torch.optim.Adam(self.actor.parameters(), lr=cfg.policy_lr)
        self.target_entropy = -float(action_dim) if cfg.target_entropy is None else cfg.target_entropy
        self.log_alpha = torch.tensor(math.log(cfg.initial_alpha), requires_grad=cfg.autotune)
        self.alpha_optimizer = torch.optim.Adam([self.log_alpha], lr=cfg.alpha_lr) if cfg.autotune else None
        self.buffer = ReplayBuffer(cfg.buffer_size, obs_dim, action_dim)

    @property
    def alpha(self) -> float:
        return self.log_alpha.exp().item()

    @torch.no_grad()
    def act(self, obs: torch.Tensor, deterministic: bool = False) -> torch.Tensor:
        """An action `(A,)` in [-1, 1] for one observation `(obs_dim,)`; uniform before `learning_starts`."""
        if self.buffer.size < self.cfg.learning_starts and not deterministic:
            return torch.rand(self.action_dim, generator=self.generator) * 2 - 1
        action, _, mode = self.actor.sample(obs[None], self.generator)
        return (mode if deterministic else action)[0]

    def observe(self, obs, action, reward: float, next_obs, done: bool = True) -> dict[str, float]:
        """Store the transition; once `learning_starts` are stored, one SAC update. Returns its stats."""
        self.buffer.add(obs, action, reward, next_obs, done)
        if self.buffer.size < self.cfg.learning_starts:
            return {}
        return self.update(*self.buffer.sample(self.cfg.batch_size, self.generator))

    def update(self, obs, actions, rewards, next_obs, dones) -> dict[str, float]:
        cfg = self.cfg
        # critics: regress both Q_i(s, a) onto the soft Bellman target y
        with torch.no_grad():
            if cfg.gamma == 0:  # bandit: y = r
                target = rewards
            else:
                next_actions, next_log_pi, _ = self.actor.sample(next_obs, self.generator)
                next_q = torch.min(self.q1_target(next_obs, next_actions), self.q2_target(next_obs, next_actions))
                target = rewards + cfg.gamma * (1 - dones) * (next_q - self.alpha * next_log_pi)
        q1, q2 = self.q1(obs, actions), self.q2(obs, actions)
        q1_loss, q2_loss = F.mse_loss(q1, target), F.mse_loss(q2, target)
        self.q_optimizer.zero_grad()
        (q1_loss + q2_loss).backward()
        self.q_optimizer.step()

        # actor: minimise alpha * log pi(a|s) - min_i Q_i(s, a), a reparameterised
        new_actions, log_pi, _ = self.actor.sample(obs, self.generator)
        q_new = torch.min(self.q1(obs, new_actions), self.q2(obs, new_actions))
        actor_loss = (self.alpha * log_pi - q_new).mean()
        self.actor_optimizer.zero_grad()
        actor_loss.backward()
        self.actor_optimizer.step()

        # temperature: J(alpha) = E[-alpha (log pi + H_target)], through log alpha
        alpha_loss = torch.zeros(())
        if self.alpha_optimizer is not None:
            alpha_loss = self.alpha_loss(log_pi.detach())
            self.alpha_optimizer.zero_grad()
            alpha_loss.backward()
            self.alpha_optimizer.step()

        polyak_update(self.q1, self.q1_target, cfg.tau)
        polyak_update(self.q2, self.q2_target, cfg.tau)
        return {
            "q1_loss": q1_loss.item(),
            "q2_loss": q2_loss.item(),
            "q_mean": q1.mean().item(),
            "actor_loss": actor_loss.item(),
            "alpha_loss": alpha_loss.item(),
            "entropy": -log_pi.mean().item(),
        }

    def alpha_loss(self, log_pi: torch.Tensor) -> torch.Tensor:
        return -(self.log_alpha.exp() * (log_pi + self.target_entropy)).mean()

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Every tensor of the agent, flat, for safetensors."""
        tensors = {"log_alpha": self.log_alpha.detach().reshape(1)}
        for name in ("actor", "q1", "q2", "q1_target", "q2_target"):
            tensors |= {f"{name}.{k}": v for k, v in getattr(self, name).state_dict().items()}
        return {k: v.detach().contiguous().cpu() for k, v in tensors.items()}

    def load_state_dict(self, tensors: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            self.log_alpha.copy_(tensors["log_alpha"][0])
        for name in ("actor", "q1", "q2", "q1_target", "q2_target"):
            prefix = f"{name}."
            getattr(self, name).load_state_dict(
                {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
            )
