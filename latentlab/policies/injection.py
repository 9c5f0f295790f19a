"""Hidden-state injection: GRPO trains a small map from the prompt's hidden state to one extra input
position, a "virtual token", while the language model stays frozen.

    h = hidden state of layer `layer` at the prompt's last position      (frozen model, no gradient)
    v = h + W3 relu(W2 relu(W1 h + b1) + b2) + b3                         (W3 = 0, b3 = 0 at the start)
    the model continues from [prompt embeddings, v]

The residual form is what makes the start an identity (v = h exactly): a plain MLP whose last layer
is zero outputs 0, not h. The loss adds l2 * ||v - h||^2, a pull back toward that start.

`variant` picks how v enters; each keeps its start in a distribution the SFT model knows (the first,
`residual`, is an input it never saw: held-out accuracy 0.49 -> 0.015 at step 0):

    residual  append v = h + MLP(h)                                           step 0: v = h
    gated     no new position: at the input of block `gate_layer`, the prompt's last position
              x <- x + g ||x|| v / ||v||,  v = h + MLP(h), g a scalar = 0      step 0: the SFT model exactly
              (Activation Oracles' additive form; LLaMA-Adapter's zero-initialised gate)
    norm      append v = scale (h + MLP(h)) / ||h + MLP(h)||                  step 0: ||v|| = scale
              (the NLA work's injection_scale; null: the embedding rows' mean L2 norm)
    token     append v = MLP(h), W3 = 0 and b3 = a token's embedding           step 0: v = that embedding
              (soft-prompt / gisting initialisation from a real token)

`shuffle_hidden` is the control: every row reads the state of another prompt of its batch.

Sampling encodes the prompt once (the same pass that reads h) and continues from its KV cache with
v as the only new input position; the GRPO loss then re-scores exactly the sampled tokens in one
teacher-forced pass over [prompt, v, completion] (`LMPolicy.logprobs`), where gradients reach the
injector through v and nothing else.
"""

import json
from contextlib import contextmanager
from pathlib import Path
from typing import Literal

import torch
from pydantic import Field, model_validator
from safetensors.torch import load_file
from torch import nn

from latentlab.common.config import Config
from latentlab.common.errors import InputError
from latentlab.lm.capture import LayerCapture, decoder_blocks, edit_block_input
from latentlab.lm.modeling import load_lm, read_manifest, save_weights, write_manifest
from latentlab.lm.prompt_format import RAW, PromptFormat
from latentlab.lm.sampling import positions_from_mask, teacher_forced_logits
from latentlab.policies.lm_policy import LMPolicy, Rollout

WEIGHTS = "injector.safetensors"
CONFIG = "injector.json"
Variant = Literal["residual", "gated", "norm", "token"]
# written to injector.json only when set: a residual injector's file stays as it was before the variants
VARIANT_FIELDS = {"variant": "residual", "gate_layer": 1, "scale": None, "init_token": None, "shuffle_hidden": False}


class InjectorConfig(Config):
    variant: Variant = "residual"
    """How v enters the frozen model (module docstring): residual (append h + MLP(h)), gated (add
    g ||x|| v/||v|| at block gate_layer's input, g = 0: Activation Oracles, LLaMA-Adapter), norm (append v
    rescaled to `scale`: NLA's injection_scale), token (append MLP(h) started at a token embedding: soft prompts)."""
    gate_layer: int = Field(1, ge=0)
    """gated: the block whose input receives the gated vector, numbered as output_hidden_states (0: the embeddings)."""
    scale: float | None = Field(None, gt=0)
    """norm: the L2 norm of the virtual token (null: the mean L2 norm of the embedding rows)."""
    init_token: str | None = None
    """token: the text of one token whose embedding is the virtual token at step 0 (null: the mean embedding row)."""
    shuffle_hidden: bool = False
    """Control: each row reads the state of another prompt of its batch (a fixed derangement of the distinct prompts)."""
    layer: int = -1
    """Hidden state that feeds the injector, indexed as output_hidden_states (0: embeddings, -1: final norm)."""
    bottleneck: int | None = Field(None, gt=0)
    """Width of the first hidden layer (null: hidden_size // 4)."""
    width: int | None = Field(None, gt=0)
    """Width of the second hidden layer (null: hidden_size)."""
    output_norm: bool = False
    """residual only: rescale v to the RMS of the token embeddings (v then starts as h's direction, not h itself)."""

    @model_validator(mode="after")
    def _output_norm_is_residual(self):
        if self.output_norm and self.variant != "residual":
            raise ValueError(f"output_norm rescales the residual variant only (variant is {self.variant})")
        return self

    def dump(self) -> dict:
        """The config as injector.json stores it: the variant fields only where they differ from the default."""
        return self.model_dump(exclude={k for k, default in VARIANT_FIELDS.items() if getattr(self, k) == default})


def unit(x: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """x / ||x|| along the last axis."""
    return x / x.norm(dim=-1, keepdim=True).clamp(min=eps)


class HiddenStateInjector(nn.Module):
    """v = h + MLP(h) (or the variant's form), MLP = H -> bottleneck -> width -> H with ReLU, its last
    layer zero-initialised. `scale` (norm) and `start` (token: the initial embedding) are buffers, the
    gate (gated) a parameter, each only in its variant, so a residual injector's weights are unchanged."""

    def __init__(
        self,
        hidden_size: int,
        cfg: InjectorConfig,
        embedding_rms: float = 1.0,
        scale: float = 1.0,
        start: torch.Tensor | None = None,
    ):
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
        if cfg.variant == "norm":
            self.register_buffer("scale", torch.tensor(float(scale)))
        if cfg.variant == "token":  # v = MLP(h) = b3 = the token's embedding at the start
            self.register_buffer("start", torch.zeros(hidden_size) if start is None else start.float().clone())
            with torch.no_grad():
                self.mlp[-1].bias.copy_(self.start)
        if cfg.variant == "gated":  # LLaMA-Adapter's zero gate: the model is untouched until g moves
            self.gate = nn.Parameter(torch.zeros(()))

    def residual(self, h: torch.Tensor) -> torch.Tensor:
        """v's distance from its start before any rescale (MLP(h); token: MLP(h) - start): what l2 pulls to 0."""
        if self.cfg.variant == "token":
            return self.mlp(h) - self.start
        return self.mlp(h)

    def forward(self, h: torch.Tensor, x: torch.Tensor | None = None) -> torch.Tensor:
        """v for the states h `(B, H)`; given the residual stream x `(B, H)` (gated), x edited by v instead.

        The gated edit goes through forward (not a method beside it) so that under DistributedDataParallel it
        is a forward of the wrapper, whose gradient hooks then average the injector's gradients over ranks.
        """
        if x is not None:
            return self.gated(x, h)
        return self.vector(h)

    def vector(self, h: torch.Tensor) -> torch.Tensor:
        """v = h + MLP(h), rescaled per variant (token: MLP(h), started at a token's embedding)."""
        if self.cfg.variant == "token":
            return self.mlp(h)
        v = h + self.mlp(h)
        if self.cfg.variant == "norm":
            return self.scale * unit(v)
        if self.cfg.output_norm:
            # RMS-normalise, then give v the scale of a token embedding: a final-layer state (after
            # the model's last norm) can be far larger than anything the first block has seen
            v = v * torch.rsqrt(v.pow(2).mean(-1, keepdim=True) + 1e-6) * self.embedding_rms
        return v

    def gated(self, x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """gated: the residual stream x `(B, H)` plus g ||x|| v / ||v|| (Activation Oracles; x itself at g = 0)."""
        v = unit(self.vector(h))
        return x + (self.gate * x.float().norm(dim=-1, keepdim=True) * v).to(x.dtype)


def build_injector(model, cfg: InjectorConfig, tokenizer=None) -> HiddenStateInjector:
    """An injector sized for `model` at its variant's start; scales measured on `model`'s embeddings
    (the token variant's `init_token` needs `tokenizer`)."""
    embeddings = model.get_input_embeddings().weight
    rows = embeddings.detach().float()
    rms = rows.pow(2).mean().sqrt().item()
    scale = cfg.scale if cfg.scale is not None else rows.norm(dim=-1).mean().item()
    start = None
    if cfg.variant == "token":
        start = rows.mean(0)
        if cfg.init_token is not None:
            if tokenizer is None:
                raise ValueError("init_token needs the tokenizer")
            ids = tokenizer(cfg.init_token, add_special_tokens=False)["input_ids"]
            if len(ids) != 1:
                raise ValueError(f"init_token {cfg.init_token!r} must be one token, it is {len(ids)}")
            start = rows[ids[0]]
    return HiddenStateInjector(model.config.hidden_size, cfg, rms, scale, start).to(embeddings.device)


def derangement(prompt_ids: torch.Tensor) -> torch.Tensor:
    """`(B,)` row indices: each row takes the row of the next distinct prompt (in sorted order, cyclically),
    so every row gets another prompt's and all copies of a prompt (a GRPO group) the same one."""
    distinct, inverse = torch.unique(prompt_ids, dim=0, return_inverse=True)
    n = distinct.shape[0]
    if n < 2:
        raise ValueError("shuffle_hidden needs at least two distinct prompts in a batch")
    rows = torch.arange(len(inverse), device=inverse.device)
    first = torch.full((n,), len(inverse), device=inverse.device).scatter_reduce(0, inverse, rows, "amin")
    return first[(inverse + 1) % n]


class InjectionPolicy(LMPolicy):
    """The frozen model continued from [prompt, injector(h)]; only the injector trains."""

    TRAINS = ("injector",)  # the base model is frozen

    def __init__(
        self, model, tokenizer, injector: HiddenStateInjector, l2: float = 0.0, prompt_format: PromptFormat = RAW
    ):
        super().__init__(model.requires_grad_(False).eval(), tokenizer, prompt_format)
        self.injector, self.l2 = injector.to(self.device), l2
        self.is_gated = injector.cfg.variant == "gated"
        if self.is_gated and injector.cfg.gate_layer >= len(decoder_blocks(model)[0]):
            raise ValueError(f"gate_layer {injector.cfg.gate_layer} must be below the number of blocks")
        self._hidden: torch.Tensor | None = None  # gated: the states of the rollout being sampled

    @torch.no_grad()
    def prepare(self, rollout: Rollout):
        """Encode the prompt once: keep h (the chosen layer at the last position) and the KV cache.

        gated: the cache keeps all but the last position, whose keys and values change from block
        gate_layer on; the sampler feeds it again, edited (`rollout`).
        """
        mask = rollout.prompt_mask
        with LayerCapture(self.model, [self.injector.cfg.layer]) as capture:
            out = self.model(
                input_ids=rollout.prompt_ids,
                attention_mask=mask,
                position_ids=positions_from_mask(mask),
                use_cache=True,
                logits_to_keep=1,
            )
            hidden = capture.last_position()[:, 0].float()  # (B, H); prompts are left-padded
        if self.injector.cfg.shuffle_hidden:
            hidden = hidden[derangement(rollout.prompt_ids)]
        rollout.extras["hidden"] = self._hidden = hidden  # gated: for the sampler's pass
        if self.is_gated:
            out.past_key_values.crop(-1)  # drop the last position
        return out.past_key_values

    @contextmanager
    def _gate(self, column: int, hidden: torch.Tensor | None = None):
        """gated: edit the prompt's last position at block gate_layer's input in the next pass, once
        (`column` within that pass; `hidden` null: the states `prepare` reads during the call).
        Other variants: nothing."""
        if not self.is_gated:
            yield
            return
        applied = False

        def edit(states: torch.Tensor, positions: torch.Tensor | None) -> torch.Tensor | None:
            nonlocal applied
            rows = self._hidden if hidden is None else hidden
            # prepare's own pass (h not read yet) stays plain; a decode step has the edit in its cache already
            if applied or rows is None:
                return None
            applied, c = True, column % states.shape[1]
            new = self.injector(rows, x=states[:, c])  # through forward: a DDP wrapper syncs the gradients
            return torch.cat([states[:, :c], new[:, None], states[:, c + 1 :]], dim=1)

        with edit_block_input(self.model, self.injector.cfg.gate_layer, edit):
            yield

    def rollout(self, prompts: list, sampling, generator: torch.Generator | None = None, group_size: int = 1):
        self._hidden = None  # set by prepare, inside the call (one row per distinct prompt)
        try:
            with self._gate(-1):  # the sampler's first pass: the prompt's last position after the cache
                return super().rollout(prompts, sampling, generator, group_size)
        finally:
            self._hidden = None

    def logprobs(self, rollout: Rollout, temperature: float) -> torch.Tensor:
        # the first pass is the prefix of one row per group (LMPolicy.logprobs): the gate edits those rows
        with self._gate(rollout.prompt_ids.shape[1] - 1, rollout.extras["hidden"][:: rollout.group_size]):
            return super().logprobs(rollout, temperature)

    def completion_logits(self, rollout: Rollout) -> torch.Tensor:
        """`(B, T, V)` logits that predict each completion token, teacher-forced, with gradients."""
        embeds, mask = self.prefix(rollout)
        with self._gate(rollout.prompt_ids.shape[1] - 1, rollout.extras["hidden"]):
            return teacher_forced_logits(self.model, embeds, mask, rollout.completions)

    def prefix(self, rollout: Rollout) -> tuple[torch.Tensor, torch.Tensor]:
        embeds, mask = super().prefix(rollout)
        if self.is_gated:  # nothing is appended: the gate edits the prompt's last position
            return embeds, mask
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
        "injector": injector.cfg.dump(),
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
