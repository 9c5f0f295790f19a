"""Hidden-state injection: GRPO trains a small map from the prompt's hidden state to one extra input
position, a "virtual token", while the language model stays frozen.

    h = hidden state of layer `layer` at the prompt's last position      (frozen model, no gradient)
    v = h + W3 relu(W2 relu(W1 h + b1) + b2) + b3                         (W3 = 0, b3 = 0 at the start)
    the model continues from [prompt embeddings, v]

The residual form is what makes the start an identity (v = h exactly): a plain MLP whose last layer
is zero outputs 0, not h. The loss adds l2 * ||v - h||^2, a pull back toward that start.

Sampling encodes the prompt once (the same pass that reads h) and continues from its KV cache with
v as the only new input position; the GRPO loss then re-scores exactly the sampled tokens in one
teacher-forced pass over [prompt, v, completion] (`LMPolicy.logprobs`), where gradients reach the
injector through v and nothing else.
"""

import json
from pathlib import Path

import torch
from pydantic import Field
from safetensors.torch import load_file
from torch import nn

from latentlab.common.config import Config
from latentlab.common.errors import InputError
from latentlab.lm.capture import LayerCapture
from latentlab.lm.modeling import load_lm, read_manifest, save_weights, write_manifest
from latentlab.lm.sampling import positions_from_mask
from latentlab.policies.lm_policy import LMPolicy, Rollout

WEIGHTS = "injector.safetensors"
CONFIG = "injector.json"


class InjectorConfig(Config):
    layer: int = -1
    """Hidden state that feeds the injector, indexed as output_hidden_states (0: embeddings, -1: final norm)."""
    bottleneck: int | None = Field(None, gt=0)
    """Width of the first hidden layer (null: hidden_size // 4)."""
    width: int | None = Field(None, gt=0)
    """Width of the second hidden layer (null: hidden_size)."""
    output_norm: bool = False
    """Rescale v to the RMS of the token embeddings (v then starts as h's direction, not h itself)."""


class HiddenStateInjector(nn.Module):
    """v = h + MLP(h), MLP = H -> bottleneck -> width -> H with ReLU, its last layer zero-initialised."""

    def __init__(self, hidden_size: int, cfg: InjectorConfig, embedding_rms: float = 1.0):
        super().__init__()
        self.hidden_size, self.cfg = hidden_size, cfg
        bottleneck, width = cfg.bottleneck or max(1, hidden_size // 4), cfg.width or hidden_size
        self.mlp = nn.Sequential(
            nn.Linear(hidden_size, bottleneck),
            nn.ReLU(),
            nn.Linear(bottleneck, width),
            nn.ReLU(),
            nn.Linear(width, hidden_size),
        )
        # a zero last layer makes MLP(h) = 0, hence v = h; its gradient is not zero (it is the
        # outer product of the upstream gradient and relu(W2 ...)), so training moves it at once
        nn.init.zeros_(self.mlp[-1].weight)
        nn.init.zeros_(self.mlp[-1].bias)
        self.register_buffer("embedding_rms", torch.tensor(float(embedding_rms)))

    def residual(self, h: torch.Tensor) -> torch.Tensor:
        """v - h before the optional rescale: what the L2 penalty pulls toward zero."""
        return self.mlp(h)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        v = h + self.residual(h)
        if self.cfg.output_norm:
            # RMS-normalise, then give v the scale of a token embedding: a final-layer state (after
            # the model's last norm) can be far larger than anything the first block has seen
            v = v * torch.rsqrt(v.pow(2).mean(-1, keepdim=True) + 1e-6) * self.embedding_rms
        return v


def build_injector(model, cfg: InjectorConfig) -> HiddenStateInjector:
    """An identity-initialised injector sized for `model`, its output scale that of `model`'s embeddings."""
    embeddings = model.get_input_embeddings().weight
    rms = embeddings.detach().float().pow(2).mean().sqrt().item()
    return HiddenStateInjector(model.config.hidden_size, cfg, rms).to(embeddings.device)


class InjectionPolicy(LMPolicy):
    """The frozen model continued from [prompt, injector(h)]; only the injector trains."""

    def __init__(self, model, tokenizer, injector: HiddenStateInjector, l2: float = 0.0):
        super().__init__(model.requires_grad_(False).eval(), tokenizer)
        self.injector, self.l2 = injector.to(self.device), l2

    @torch.no_grad()
    def prepare(self, rollout: Rollout):
        """Encode the prompt once: keep h (the chosen layer at the last position) and the KV cache."""
        mask = rollout.prompt_mask
        with LayerCapture(self.model, [self.injector.cfg.layer]) as capture:
            out = self.model(
                input_ids=rollout.prompt_ids,
                attention_mask=mask,
                position_ids=positions_from_mask(mask),
                use_cache=True,
                logits_to_keep=1,
            )
            rollout.extras["hidden"] = capture.last_position()[:, 0].float()  # (B, H); prompts are left-padded
        return out.past_key_values

    def prefix(self, rollout: Rollout) -> tuple[torch.Tensor, torch.Tensor]:
        embeds, mask = super().prefix(rollout)
        virtual = self.injector(rollout.extras["hidden"]).to(embeds.dtype)
        return torch.cat([embeds, virtual[:, None]], dim=1), torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return list(self.injector.parameters())

    def regularizers(self, rollout: Rollout) -> dict[str, torch.Tensor]:
        # l2 * mean over rows of ||v - h||^2 (on the residual, so it is 0 at the start in both output modes)
        return {"l2_reg": self.l2 * self.injector.residual(rollout.extras["hidden"]).pow(2).sum(-1).mean()}

    def train(self, mode: bool = True) -> None:
        self.model.eval()  # the base never leaves eval mode: it is frozen, dropout included
        self.injector.train(mode)


def save_injector(injector: HiddenStateInjector, directory: Path, base: str | Path, **provenance) -> str:
    """injector.safetensors + injector.json (shape and base model) + manifest; returns the content hash.

    `base` is recorded as given (a path relative to the DAG's root travels with a clone), next to the
    content hash from its manifest, which loading checks.
    """
    directory.mkdir(parents=True, exist_ok=True)
    save_weights(injector, directory / WEIGHTS)
    config = {
        "base_model": str(base),
        "base_sha256": read_manifest(base).get("content_sha256"),
        "hidden_size": injector.hidden_size,
        "injector": injector.cfg.model_dump(),
    }
    (directory / CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return write_manifest(directory, **provenance)


def load_injection_policy(directory: str | Path, device: torch.device | str = "cpu") -> InjectionPolicy:
    """The saved injector on the base model its config names (refused if that base has changed)."""
    directory = Path(directory)
    config = json.loads((directory / CONFIG).read_text())
    base, expected = config["base_model"], config["base_sha256"]
    found = read_manifest(base).get("content_sha256")
    if expected is not None and found != expected:
        raise InputError(
            f"{directory} was trained on {base} with content hash {expected[:12]}…, "
            f"but {base} now has {found and found[:12]}: retrain the injector or restore that model"
        )
    model, tokenizer = load_lm(base, device)
    injector = HiddenStateInjector(config["hidden_size"], InjectorConfig.model_validate(config["injector"]))
    injector.load_state_dict(load_file(directory / WEIGHTS))
    return InjectionPolicy(model, tokenizer, injector)
