"""The NLA critic: reads an explanation and reconstructs the activation vector it explains.

As published (Fraser-Taliente, Kantamneni, Ong et al., 2026): the base model truncated at the
extraction layer K (its blocks 0..K-1, so its output is the state the vector was read from; the
final norm only when K is the last layer), a pooling over the text's positions and a linear head
to the vector's dimension, initialised to the identity when the dimensions match (its bias to
-mean when the vectors are centred), so the untrained critic already maps the gold text to roughly
the state its vector came from.

Pooling over the real tokens of each row (right padding never enters any pool):
    last      the last real token (the end-of-sequence every text is closed with)
    mean      the mean over real tokens
    max       the element-wise max over real tokens
    cls       the first token
    weighted  softmax over real positions of a learned score w . h_t (w = 0 at the start: the mean)

Loss on L2-normalised vectors p = unit(pred), t = unit(v - mean):
    mse        ||p - t||^2 = 2 (1 - cos)          (the reward's reconstruction error, too)
    smooth_l1  Huber loss per coordinate, summed
    cosine     1 - cos
"""

import copy
import json
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field
from safetensors.torch import load_file
from torch import nn

from latentlab.common.config import Config
from latentlab.lm.capture import decoder_blocks, resolve_layers
from latentlab.lm.modeling import save_weights, write_manifest
from latentlab.lm.padding import pad_sequences
from latentlab.policies.nla_actor import unit

WEIGHTS, CONFIG = "nla_critic.safetensors", "nla_critic.json"
ORTHOGONAL_MSE = 2.0  # ||p - t||^2 of unit vectors with cos = 0: the error of an empty explanation
Pooling = Literal["last", "mean", "max", "cls", "weighted"]


class NLACriticConfig(Config):
    layer: int | None = None
    """K: the extraction layer (output_hidden_states numbering); the critic keeps blocks 0..K-1 (null: the
    layer the vectors were read from, which the caller supplies; nla_sft takes label.nla_layer)."""
    pooling: Pooling = "mean"
    """How the text's states become one vector: last | mean | max | cls | weighted."""
    loss: Literal["mse", "smooth_l1", "cosine"] = "mse"
    """Reconstruction loss on L2-normalised vectors."""
    center: bool = True
    """Reconstruct unit(v - training mean), as the actor reads it."""
    max_tokens: int = Field(48, gt=0)
    """Texts are cut to this many tokens (end-of-sequence included)."""


def pool(states: torch.Tensor, mask: torch.Tensor, how: str, scores: torch.Tensor | None = None) -> torch.Tensor:
    """`(B, T, H)` states, `(B, T)` mask of real tokens (right-padded) -> `(B, H)`; padding is never read."""
    real = mask.bool()
    if how == "mean":
        return (states * real[..., None]).sum(1) / real.sum(1, keepdim=True).clamp(min=1)
    if how == "max":
        return states.masked_fill(~real[..., None], float("-inf")).amax(1)
    if how == "cls":
        return states[:, 0]
    if how == "last":
        return states[torch.arange(len(states)), real.sum(1) - 1]
    if how == "weighted":
        weights = torch.softmax(scores.masked_fill(~real, float("-inf")), dim=1)  # (B, T), 0 on padding
        return (weights[..., None] * states).sum(1)
    raise ValueError(f"unknown pooling {how!r}")


def reconstruction_loss(pred: torch.Tensor, target: torch.Tensor, kind: str = "mse") -> torch.Tensor:
    """Per-row loss `(B,)` between unit(pred) and the unit target."""
    p = unit(pred.float())
    if kind == "mse":
        return (p - target).pow(2).sum(-1)
    if kind == "smooth_l1":
        return F.smooth_l1_loss(p, target, reduction="none").sum(-1)
    if kind == "cosine":
        return 1 - (p * target).sum(-1)
    raise ValueError(f"unknown loss {kind!r}")


class NLACritic(nn.Module):
    def __init__(self, encoder: nn.Module, tokenizer, cfg: NLACriticConfig, dim: int, mean: torch.Tensor):
        super().__init__()
        self.encoder, self.tokenizer, self.cfg, self.dim = encoder, tokenizer, cfg, dim
        hidden = encoder.config.hidden_size
        self.register_buffer("mean", mean.float().clone() if cfg.center else torch.zeros(dim))
        self.head = nn.Linear(hidden, dim)
        self.score = nn.Parameter(torch.zeros(hidden))  # the weighted pooling's w (unused by the others)
        # frozen where unused (it never had a gradient, so nothing changes): DDP wants a gradient for every
        # parameter that requires one
        self.score.requires_grad_(cfg.pooling == "weighted")
        with torch.no_grad():
            if hidden == dim:  # identity start: pred = pooled state - mean, the centred vector's estimate
                self.head.weight.copy_(torch.eye(dim))
                self.head.bias.copy_(-self.mean)

    @property
    def device(self) -> torch.device:
        return self.head.weight.device

    def target(self, vectors) -> torch.Tensor:
        """unit(v - mean) `(B, d)`: what the critic reconstructs."""
        v = torch.tensor(np.array(vectors, dtype=np.float32), device=self.device)
        return unit(v - self.mean)

    def encode(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Right-padded `(ids, mask)` of text + end-of-sequence (an empty text is the end-of-sequence alone)."""
        eos, cap = self.tokenizer.eos_token_id, self.cfg.max_tokens
        tokens = self.tokenizer(list(texts), add_special_tokens=False)["input_ids"]
        ids, mask = pad_sequences([(t[: cap - 1]) + [eos] for t in tokens], self.tokenizer.pad_token_id, False)
        return ids.to(self.device), mask.to(self.device)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """`(B, T)` right-padded ids -> `(B, d)` raw predictions (normalise before comparing)."""
        states = self.encoder(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
        pooled = pool(states, mask, self.cfg.pooling, states @ self.score if self.cfg.pooling == "weighted" else None)
        return self.head(pooled)

    def predict(self, texts: list[str]) -> torch.Tensor:
        return self(*self.encode(texts))

    def loss(self, texts: list[str], vectors, net: nn.Module | None = None) -> torch.Tensor:
        """Mean reconstruction loss of `vectors` from `texts`; `net` runs the forward pass (under torchrun the
        critic's DDP wrapper, whose forward averages the gradients across ranks; default the critic itself)."""
        return reconstruction_loss(
            (self if net is None else net)(*self.encode(texts)), self.target(vectors), self.cfg.loss
        ).mean()


def baseline_mse(critic: NLACritic, vectors: np.ndarray) -> float:
    """E||t - mean(t)||^2 over `vectors`: the error of always predicting the mean target (FVE's denominator)."""
    with torch.no_grad():
        t = critic.target(vectors)
        return (t - t.mean(0)).pow(2).sum(-1).mean().item()


@torch.no_grad()
def reconstruction_mse(
    critic: NLACritic, texts: list[str], vectors, batch: int = 512, empty_is_orthogonal: bool = True
) -> torch.Tensor:
    """`(N,)` ||unit(critic(text)) - t||^2; an empty (whitespace-only) text counts as orthogonal (MSE 2),
    unless `empty_is_orthogonal` is False (then the critic reads it: the empty-explanation control)."""
    was_training = critic.training
    critic.eval()
    out = []
    for lo in range(0, len(texts), batch):
        out.append(reconstruction_loss(critic.predict(texts[lo : lo + batch]), critic.target(vectors[lo : lo + batch])))
    critic.train(was_training)
    mse = torch.cat(out)
    empty = torch.tensor([empty_is_orthogonal and not t.strip() for t in texts], device=mse.device)
    return torch.where(empty, torch.full_like(mse, ORTHOGONAL_MSE), mse)


def truncated_encoder(model, layer: int) -> nn.Module:
    """A copy of `model`'s decoder keeping blocks 0..K-1: its last_hidden_state is hidden state K."""
    encoder = copy.deepcopy(model.get_decoder())
    blocks, _ = decoder_blocks(model)
    (k,) = resolve_layers([layer], len(blocks))
    encoder.layers = encoder.layers[:k]
    encoder.config.num_hidden_layers = k
    if k < len(blocks):  # the final norm belongs to the last layer only
        encoder.norm = nn.Identity()
    return encoder


def build_critic(model, tokenizer, cfg: NLACriticConfig, vectors: np.ndarray) -> NLACritic:
    if cfg.layer is None:
        raise ValueError("the critic's layer is not set: give the layer the vectors were read from")
    mean = torch.tensor(np.array(vectors, dtype=np.float32)).mean(0)
    critic = NLACritic(truncated_encoder(model, cfg.layer), tokenizer, cfg, vectors.shape[1], mean)
    return critic.to(next(model.parameters()).device)


def save_critic(critic: NLACritic, directory: Path, **provenance) -> str:
    """All weights in one safetensors file, the encoder's HF config + the critic's JSON + tokenizer + manifest."""
    directory.mkdir(parents=True, exist_ok=True)
    save_weights(critic, directory / WEIGHTS)
    critic.encoder.config.save_pretrained(directory)
    critic.tokenizer.save_pretrained(directory)
    final_norm = not isinstance(critic.encoder.norm, nn.Identity)
    config = {"dim": critic.dim, "final_norm": final_norm, "critic": critic.cfg.model_dump()}
    (directory / CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return write_manifest(directory, **provenance)


def load_critic(directory: str | Path, device: torch.device | str = "cpu") -> NLACritic:
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    directory = Path(directory)
    config = json.loads((directory / CONFIG).read_text())
    encoder = AutoModel.from_config(AutoConfig.from_pretrained(directory))
    if not config["final_norm"]:
        encoder.norm = nn.Identity()
    state = load_file(directory / WEIGHTS)
    critic = NLACritic(
        encoder,
        AutoTokenizer.from_pretrained(directory),
        NLACriticConfig.model_validate(config["critic"]),
        config["dim"],
        state["mean"],
    )
    critic.load_state_dict(state)
    return critic.to(device).eval()
