"""The NLA critic: reads an explanation and reconstructs the activation vector it explains.

As published (Fraser-Taliente, Kantamneni, Ong et al., 2026): the base model truncated at the
extraction layer K (its blocks 0..K-1, so its output is the state the vector was read from; the
final norm only when K is the last layer), a pooling over the text's positions and a linear head
to the vector's dimension, initialised to the identity (on the targets' scale, below) when the
dimensions match, so the untrained critic already maps the gold text to roughly the target of the
state its vector came from.

Targets, on one fixed scale set by the training vectors v_1..v_N (`build_critic`):
    mu     the training mean (`center: false`: 0)                         the `mean` buffer
    sigma  sqrt(mean_i ||v_i - mu||^2): ONE scalar, the RMS norm of the    the `scale` buffer
           centred training vectors (not per coordinate, not per row)
    t      (v - mu) / sigma, so mean_i ||t_i||^2 = 1 over the training vectors
The critic's raw output t_hat is its prediction of t (no normalisation; v_hat = mu + sigma t_hat),
and the identity start is head(h) = (h - mu) / sigma: the gold pooled state maps to its own target.

Pooling over the real tokens of each row (right padding never enters any pool), the extractor's own
`latentlab.lm.pooling.pool`:
    last      the last real token (the end-of-sequence every text is closed with)
    mean      the mean over real tokens
    max       the element-wise max over real tokens
    cls       the first token
    weighted  softmax over real positions of a learned score w . h_t (w = 0 at the start: the mean)

Losses per row between t_hat and t:
    mse        ||t_hat - t||^2                     (the reward's reconstruction error, too)
    smooth_l1  Huber loss per coordinate, summed
    cosine     1 - cos(t_hat, t)                   (direction only: the norm of t_hat is free)

Metrics over a set of rows (held-out vectors in `evaluate`):
    FVE     1 - sum_i ||t_i - t_hat_i||^2 / sum_i ||t_i - mean(t)||^2, mean(t) the set's own mean:
            a perfect critic scores 1, predicting the set's mean 0, worse than that below 0. sigma
            cancels and mu drops out of the denominator, so it is the same number as
            1 - sum ||v - v_hat||^2 / sum ||v - mean(v)||^2 on the vectors' own scale.
    cosine  mean_i cos(t_hat_i, t_i), a metric of its own (not derived from the MSE).
"""

import copy
import json
import tempfile
from pathlib import Path
from typing import Literal, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field
from safetensors.torch import load_file
from torch import nn

from latentlab.common.config import Config
from latentlab.common.errors import InputError
from latentlab.lm.capture import decoder_layout, resolve_layers
from latentlab.lm.modeling import load_tokenizer, save_weights, verify_manifest, write_manifest
from latentlab.lm.padding import pad_sequences
from latentlab.lm.pooling import Pooling, pool

WEIGHTS, CONFIG = "nla_critic.safetensors", "nla_critic.json"


class NLACriticSettings(Config):
    """What a user chooses about the critic; its layer is a fact of the vectors (`NLACriticConfig`)."""

    pooling: Pooling = "mean"
    """How the text's states become one vector: last | mean | max | cls | weighted."""
    loss: Literal["mse", "smooth_l1", "cosine"] = "mse"
    """Loss between the raw prediction and the target t = (v - mu) / sigma (mse: squared error; cosine:
    direction only)."""
    center: bool = True
    """mu = the training mean, as the actor centres what it reads (false: mu = 0, t = v / sigma)."""
    max_tokens: int = Field(48, gt=0)
    """Texts are cut to this many tokens (end-of-sequence included)."""


class NLACriticConfig(NLACriticSettings):
    layer: int | None = None
    """K: the extraction layer (output_hidden_states numbering); the critic keeps blocks 0..K-1. It must be the
    layer the vectors were read from: nla_sft takes it from the NLA table's metadata (hidden/nla_table.py)."""


def reconstruction_loss(pred: torch.Tensor, target: torch.Tensor, kind: str = "mse") -> torch.Tensor:
    """Per-row loss `(B,)` between the raw prediction t_hat and the target t (both on the targets' scale)."""
    p = pred.float()
    if kind == "mse":
        return (p - target).pow(2).sum(-1)
    if kind == "smooth_l1":
        return F.smooth_l1_loss(p, target, reduction="none").sum(-1)
    if kind == "cosine":
        return 1 - F.cosine_similarity(p, target, dim=-1, eps=1e-8)
    raise ValueError(f"unknown loss {kind!r}")


def mean_predictor_error(targets: torch.Tensor) -> float:
    """mean_i ||t_i - mean(t)||^2 over the rows of `targets`: the MSE of predicting the set's own mean target,
    FVE's denominator (per row)."""
    t = targets.double()
    return (t - t.mean(0)).pow(2).sum(-1).mean().item()


def fraction_of_variance_explained(squared_errors: torch.Tensor, targets: torch.Tensor) -> float:
    """FVE = 1 - sum_i ||t_i - t_hat_i||^2 / sum_i ||t_i - mean(t)||^2, from the per-row squared errors and the
    rows' targets. 1: a perfect prediction; 0: the targets' own mean; below 0: worse than that. `targets` may
    hold each distinct row once where every row was scored equally often (GRPO's groups): both sides are
    means, so the value is the same. NaN where the targets do not vary (one vector: nothing to explain)."""
    variance = mean_predictor_error(targets)
    return 1 - squared_errors.double().mean().item() / variance if variance > 0 else float("nan")


class NLACritic(nn.Module):
    def __init__(
        self, encoder: nn.Module, tokenizer, cfg: NLACriticConfig, dim: int, mean: torch.Tensor, scale: torch.Tensor
    ):
        """`mean` (mu, `(d,)`; zeros when not centred) and `scale` (sigma, a positive scalar) fix the targets'
        scale: t = (v - mu) / sigma. `build_critic` measures them on the training vectors."""
        super().__init__()
        self.encoder, self.tokenizer, self.cfg, self.dim = encoder, tokenizer, cfg, dim
        hidden = encoder.config.hidden_size
        self.register_buffer("mean", mean.float().clone())
        self.register_buffer("scale", torch.as_tensor(scale, dtype=torch.float32).clone().reshape(()))
        self.head = nn.Linear(hidden, dim)
        self.score = nn.Parameter(torch.zeros(hidden))  # the weighted pooling's w (unused by the others)
        # frozen where unused (it never had a gradient, so nothing changes): DDP wants a gradient for every
        # parameter that requires one
        self.score.requires_grad_(cfg.pooling == "weighted")
        with torch.no_grad():
            if hidden == dim:  # identity start: t_hat = (pooled state - mu) / sigma, the target of that state
                self.head.weight.copy_(torch.eye(dim) / self.scale)
                self.head.bias.copy_(-self.mean / self.scale)

    @property
    def device(self) -> torch.device:
        return self.head.weight.device

    def target(self, vectors) -> torch.Tensor:
        """t = (v - mu) / sigma `(B, d)`: what the critic reconstructs."""
        v = torch.tensor(np.array(vectors, dtype=np.float32), device=self.device)
        return (v - self.mean) / self.scale

    def vector(self, prediction: torch.Tensor) -> torch.Tensor:
        """v_hat = mu + sigma t_hat: a prediction on the vectors' own scale."""
        return self.mean + self.scale * prediction

    def encode(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Right-padded `(ids, mask)` of text + end-of-sequence (an empty text is the end-of-sequence alone)."""
        eos, cap = self.tokenizer.eos_token_id, self.cfg.max_tokens
        tokens = self.tokenizer(list(texts), add_special_tokens=False)["input_ids"]
        ids, mask = pad_sequences([(t[: cap - 1]) + [eos] for t in tokens], self.tokenizer.pad_token_id, False)
        return ids.to(self.device), mask.to(self.device)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """`(B, T)` right-padded ids -> `(B, d)` predictions t_hat of the targets t = (v - mu) / sigma."""
        states = self.encoder(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
        pooled = pool(states, mask, self.cfg.pooling, states @ self.score if self.cfg.pooling == "weighted" else None)
        return self.head(pooled.to(self.head.weight.dtype))  # pool is float32; the head may be in the model's dtype

    def predict(self, texts: list[str]) -> torch.Tensor:
        return self(*self.encode(texts))

    def losses(self, texts: list[str], vectors, net: nn.Module | None = None) -> torch.Tensor:
        """`(N,)` reconstruction losses of `vectors` from `texts`; `net` runs the forward pass (under torchrun the
        critic's wrapper, which averages the gradients across ranks; default the critic itself)."""
        return reconstruction_loss(
            (self if net is None else net)(*self.encode(texts)), self.target(vectors), self.cfg.loss
        )


def mean_predictor_mse(critic: NLACritic, vectors) -> float:
    """mean_i ||t_i - mean(t)||^2 over `vectors`: the error of predicting their own mean target (FVE's
    denominator; ~1 for vectors like the training ones, exactly 1 on the training set when centred)."""
    with torch.no_grad():
        return mean_predictor_error(critic.target(vectors))


class Reconstruction(NamedTuple):
    """Per-row `(N,)` errors of the critic's predictions t_hat against the targets t."""

    mse: torch.Tensor
    """||t_hat - t||^2, in [0, inf): 0 is exact, ~1 is the mean predictor (t_hat = 0), 4 a mirrored guess."""
    cosine: torch.Tensor
    """cos(t_hat, t) (0 where t_hat = 0)."""


@torch.no_grad()
def reconstruct(
    critic: NLACritic, texts: list[str], vectors, batch: int = 512, read_empty: bool = False
) -> Reconstruction:
    """The critic reads `texts` and predicts the targets of `vectors`.

    An empty (whitespace-only) text is not read: it predicts t_hat = 0 (v_hat = mu, the training mean: what
    is known with no explanation), so its error is ||t||^2, the mean predictor's on that row, and its cosine
    0. The RL reward thus gives an empty explanation exactly what knowing nothing earns, no more (the critic
    reading a bare end-of-sequence may land nearer some vectors by chance) and no less. `read_empty=True`
    lets the critic read it (the empty-explanation control of the evaluation)."""
    read = [i for i, text in enumerate(texts) if read_empty or text.strip()]
    target = critic.target(vectors)
    pred = torch.zeros_like(target)  # t_hat = 0 where a text is empty
    if read:
        was_training = critic.training
        critic.eval()
        texts = [texts[i] for i in read]
        pred[read] = torch.cat([critic.predict(texts[lo : lo + batch]).float() for lo in range(0, len(texts), batch)])
        critic.train(was_training)
    return Reconstruction(reconstruction_loss(pred, target, "mse"), F.cosine_similarity(pred, target, dim=-1, eps=1e-8))


def truncate_config(config, k: int):
    """`config` (a decoder's Hugging Face config, changed in place and returned) for its first `k` blocks: the
    layer count (`num_hidden_layers`, GPT-2's `n_layer` behind it) and the per-layer `layer_types`."""
    config.num_hidden_layers = k
    if getattr(config, "layer_types", None) is not None:
        config.layer_types = list(config.layer_types[:k])
    return config


def truncated_encoder(model, layer: int) -> nn.Module:
    """A copy of `model`'s decoder body keeping blocks 0..K-1: its last_hidden_state is hidden state K. Only
    the kept blocks (and the embeddings) are copied; the final norm only when K is the last layer (otherwise
    an identity). Blocks in `layers` or `h`, final norm `norm` or `ln_f` (lm/capture.py `decoder_layout`)."""
    decoder, blocks_name, norm_name = decoder_layout(model)
    blocks, norm = getattr(decoder, blocks_name), getattr(decoder, norm_name)
    (k,) = resolve_layers([layer], len(blocks))
    keep_norm = k == len(blocks)  # the final norm belongs to the last layer only
    # the copy sees the kept blocks alone: the decoder's own lists are put back at once (also on an exception)
    setattr(decoder, blocks_name, nn.ModuleList(blocks[:k]))
    if not keep_norm:
        setattr(decoder, norm_name, nn.Identity())
    try:
        encoder = copy.deepcopy(decoder)
    finally:
        setattr(decoder, blocks_name, blocks)
        setattr(decoder, norm_name, norm)
    truncate_config(encoder.config, k)  # the copy's own config, which its blocks share
    return encoder


def has_final_norm(encoder: nn.Module) -> bool:
    """Whether a (truncated) decoder body ends in its final norm (not the identity of a middle layer)."""
    _, _, norm_name = decoder_layout(encoder)
    return not isinstance(getattr(encoder, norm_name), nn.Identity)


def target_scale(vectors: np.ndarray, center: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(mu, sigma) of the training `vectors`: mu their mean (zeros unless `center`), sigma = sqrt(mean_i
    ||v_i - mu||^2), so the targets t = (v - mu) / sigma have mean_i ||t_i||^2 = 1."""
    v = torch.tensor(np.array(vectors, dtype=np.float64))
    mean = v.mean(0) if center else torch.zeros(v.shape[1], dtype=torch.float64)
    scale = (v - mean).pow(2).sum(-1).mean().sqrt()
    if not scale > 0:
        raise ValueError(
            f"the critic's {len(v)} training vectors do not vary (sigma = {scale.item()}): no target scale"
        )
    return mean.float(), scale.float()


def build_critic(model, tokenizer, cfg: NLACriticConfig, vectors: np.ndarray) -> NLACritic:
    """The critic on a truncated copy of `model` (blocks 0..cfg.layer-1), checked by `check_critic` before it
    is returned: what would stop its save or load after training stops here."""
    if cfg.layer is None:
        raise ValueError("the critic's layer is not set: give the layer the vectors were read from")
    mean, scale = target_scale(vectors, cfg.center)
    critic = NLACritic(truncated_encoder(model, cfg.layer), tokenizer, cfg, vectors.shape[1], mean, scale)
    check_critic(critic)
    return critic.to(next(model.parameters()).device)


def rebuild_encoder(directory: Path, final_norm: bool) -> nn.Module:
    """The (truncated) decoder body a critic directory's Hugging Face config describes, randomly initialised
    (`LlamaModel`, `Qwen2Model`, `GPT2Model`, ...); the final norm an identity unless `final_norm`."""
    from transformers import AutoConfig, AutoModel

    encoder = AutoModel.from_config(AutoConfig.from_pretrained(directory))
    if not final_norm:
        _, _, norm_name = decoder_layout(encoder)
        setattr(encoder, norm_name, nn.Identity())
    return encoder


PROBE = "The critic reads 12+7=19 and 40-9=31.\n  Then: x_1, y (z)!\n"
"""A text the tokenizer round trip of `check_critic` must encode as before (digits, spaces, newlines)."""


def check_critic(critic: NLACritic) -> None:
    """A dry save/load round trip of all but the weights, in a temporary directory, in a second or so whatever
    the model's size (the tokenizer's reload dominates: 1.2 s for Qwen3's on a 0.6B-shaped model): the
    encoder's config and the tokenizer saved as `save_critic` saves them (a config that does not validate, as
    a truncation that left `layer_types` behind, fails there), the encoder rebuilt from them as `load_critic`
    rebuilds it (on the meta device: no memory, no weights; the random state is left as it was), the rebuilt
    state's names and shapes compared to the critic's, and the reloaded tokenizer's ids of a probe text to the
    critic's. A ValueError says what does not round-trip."""
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        try:
            critic.encoder.config.save_pretrained(directory)
            critic.tokenizer.save_pretrained(directory)
            with torch.random.fork_rng(devices=[]), torch.device("meta"):
                rebuilt = rebuild_encoder(directory, has_final_norm(critic.encoder)).state_dict()
            tokenizer = load_tokenizer(directory)
        except Exception as error:  # noqa: BLE001 (transformers validates with errors of its own classes)
            raise ValueError(
                f"the critic ({type(critic.encoder).__name__}, {critic.encoder.config.num_hidden_layers} blocks) "
                f"could not be saved and loaded back: {error}"
            ) from error
    have = {name: tuple(value.shape) for name, value in critic.encoder.state_dict().items()}
    again = {name: tuple(value.shape) for name, value in rebuilt.items()}
    if have != again:
        differ = sorted(name for name in have.keys() | again.keys() if have.get(name) != again.get(name))
        raise ValueError(
            f"the critic's encoder would not load back from its saved config: {len(differ)} weights differ "
            f"in name or shape ({', '.join(differ[:5])}{', ...' if len(differ) > 5 else ''})"
        )
    ids, again_ids = (t(PROBE, add_special_tokens=False)["input_ids"] for t in (critic.tokenizer, tokenizer))
    if ids != again_ids:
        raise ValueError(
            f"the critic's tokenizer ({type(critic.tokenizer).__name__}) loads back as {type(tokenizer).__name__}, "
            f"which encodes {PROBE!r} otherwise: {ids} -> {again_ids}"
        )


def save_critic(critic: NLACritic, directory: Path, **provenance) -> str:
    """All weights in one safetensors file, the encoder's HF config + the critic's JSON + tokenizer + manifest."""
    directory.mkdir(parents=True, exist_ok=True)
    save_weights(critic, directory / WEIGHTS)
    critic.encoder.config.save_pretrained(directory)
    critic.tokenizer.save_pretrained(directory)
    config = {"dim": critic.dim, "final_norm": has_final_norm(critic.encoder), "critic": critic.cfg.model_dump()}
    (directory / CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return write_manifest(directory, **provenance)


def load_critic(directory: str | Path, device: torch.device | str = "cpu") -> NLACritic:
    directory = Path(directory)
    verify_manifest(directory)  # a damaged or changed file stops here, named (LATENTLAB_SKIP_VERIFY=1 skips)
    config = json.loads((directory / CONFIG).read_text())
    encoder = rebuild_encoder(directory, config["final_norm"])
    state = load_file(directory / WEIGHTS)
    if "scale" not in state:  # saved before issue 25: trained on unit-normalised targets, no sigma to recover
        raise InputError(
            f"{directory}: a critic saved before the targets were put on a fixed scale (it has no `scale`, and its "
            "head was trained on unit-normalised targets, so its outputs mean nothing on the new scale); rerun "
            "`dvc repro nla_sft` (and the stages after it)"
        )
    critic = NLACritic(
        encoder,
        load_tokenizer(directory),
        NLACriticConfig.model_validate(config["critic"]),
        config["dim"],
        state["mean"],
        state["scale"],
    )
    critic.load_state_dict(state)
    return critic.to(device).eval()
