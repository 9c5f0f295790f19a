"""The actor-critic of the grid world: a small CNN on the image observation, concatenated with the
LM's pooled hidden state of the observation's text, into an actor head (action logits) and a
critic head (V(s)). `use_hidden: false` is the observation-only baseline through the same code:
the hidden state is simply not an input (the reference's ActorCriticConvAug, awr_aug.py).

Saved as safetensors + a JSON config (+ the manifest with the content hash); never pickled.
"""

import json
from pathlib import Path

import torch
from pydantic import Field
from safetensors.torch import load_file
from torch import nn

from latentlab.common.config import Config
from latentlab.common.errors import NonFiniteLogitsError
from latentlab.lm.modeling import save_weights, verify_manifest, write_manifest

CONFIG, WEIGHTS = "policy_config.json", "policy.safetensors"


class ActorCriticConfig(Config):
    image: tuple[int, int] = (28, 28)
    """(H, W) of the RGB observation."""
    actions: int = Field(3, gt=0)
    """Discrete actions."""
    hidden_size: int = Field(64, gt=0)
    """Size of the LM's pooled hidden state (unused when use_hidden is false)."""
    use_hidden: bool = True
    """Concatenate the pooled hidden state to the CNN features (false: observation-only baseline)."""
    channels: int = Field(16, gt=0)
    """Channels of the first conv layer (the second and third have twice as many)."""
    features: int = Field(128, gt=0)
    """Width of the CNN's output features and of the heads' hidden layer."""


class ActorCritic(nn.Module):
    def __init__(self, cfg: ActorCriticConfig):
        super().__init__()
        self.cfg = cfg
        c, (h, w) = cfg.channels, cfg.image
        self.cnn = nn.Sequential(  # (B, 3, H, W) -> (B, features)
            nn.Conv2d(3, c, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),  # H/2
            nn.Conv2d(c, 2 * c, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),  # H/4
            nn.Conv2d(2 * c, 2 * c, 3, padding=1),
            nn.ReLU(),
            nn.Flatten(),
            nn.Linear(2 * c * (h // 4) * (w // 4), cfg.features),
            nn.ReLU(),
        )
        # the LM's states live on their own scale (and differ between layers): each feature is standardised
        # with the training set's mean and std (`fit_hidden_scale`), saved with the weights
        self.use_hidden = cfg.use_hidden
        if cfg.use_hidden:
            self.register_buffer("hidden_mean", torch.zeros(cfg.hidden_size))
            self.register_buffer("hidden_std", torch.ones(cfg.hidden_size))
        joint = cfg.features + (cfg.hidden_size if cfg.use_hidden else 0)
        self.actor = nn.Sequential(nn.Linear(joint, cfg.features), nn.ReLU(), nn.Linear(cfg.features, cfg.actions))
        self.critic = nn.Sequential(nn.Linear(joint, cfg.features), nn.ReLU(), nn.Linear(cfg.features, 1))

    def forward(self, image: torch.Tensor, hidden: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """image (B, H, W, 3) uint8, hidden (B, hidden_size) -> logits (B, actions), value (B,)."""
        x = self.cnn(image.permute(0, 3, 1, 2).float() / 255.0)  # (B, features)
        if self.cfg.use_hidden:
            if hidden is None:
                raise ValueError("this policy takes the hidden state (use_hidden: true); none was given")
            hidden = (hidden.float() - self.hidden_mean) / self.hidden_std
            x = torch.cat([x, hidden], dim=1)  # (B, features + hidden_size)
        return self.actor(x), self.critic(x).squeeze(1)

    @torch.no_grad()
    def fit_hidden_scale(self, hidden: torch.Tensor, eps: float = 1e-6) -> None:
        """Standardise the hidden input by the mean and std of `hidden` (N, hidden_size), the training states."""
        self.hidden_mean.copy_(hidden.float().mean(0))
        self.hidden_std.copy_(hidden.float().std(0) + eps)

    @torch.no_grad()
    def act(self, image: torch.Tensor, hidden: torch.Tensor | None = None, greedy: bool = True, generator=None):
        """Actions (B,): the most likely (greedy) or sampled from pi(.|s). NaN or inf logits (diverged weights,
        or broken inputs) raise NonFiniteLogitsError rather than act on garbage or fail inside torch.multinomial."""
        logits, _ = self(image, hidden)
        if not torch.isfinite(logits).all():
            raise NonFiniteLogitsError(
                "the actor's logits are not finite (NaN or inf): its weights have diverged "
                "(lower the learning rate) or the observation / hidden state holds NaN or inf"
            )
        if greedy:
            return logits.argmax(1)
        return torch.multinomial(logits.softmax(1), 1, generator=generator).squeeze(1)


def save_policy(model: ActorCritic, directory: Path, **provenance) -> str:
    """Write weights and config into `directory` (created); returns the content hash."""
    directory.mkdir(parents=True, exist_ok=True)
    save_weights(model, directory / WEIGHTS)
    (directory / CONFIG).write_text(json.dumps(model.cfg.model_dump(), indent=2) + "\n")
    return write_manifest(directory, **provenance)


def load_policy(directory: str | Path, device: str | torch.device = "cpu") -> ActorCritic:
    directory = Path(directory)
    if not (directory / CONFIG).exists():
        raise FileNotFoundError(f"{directory} holds no policy ({CONFIG}); run `dvc repro policy`")
    verify_manifest(directory)  # a damaged or changed file stops here, named (LATENTLAB_SKIP_VERIFY=1 skips)
    raw = json.loads((directory / CONFIG).read_text())
    model = ActorCritic(ActorCriticConfig.model_validate({**raw, "image": tuple(raw["image"])}))
    model.load_state_dict(load_file(directory / WEIGHTS, device=str(device)))
    return model.to(device).eval()
