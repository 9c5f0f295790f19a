"""The NLA actor: a language model that reads an activation vector and writes an explanation of it.

Natural language autoencoders (Fraser-Taliente, Kantamneni, Ong et al., Transformer Circuits 2026):
the actor reads a fixed template with one `<INJECT>` position where the vector goes, and generates
text; the critic (nla_critic.py) reads the text back into the vector.

    u = (v - mean) / ||v - mean||                     the vector, centred and L2-normalised
    x = scale_l * m_l(u) / ||m_l(u)||                 at a fixed norm per injection layer l
    replace:  h_l[inject] = x          m_l = identity (a learned linear map when d != H)
    add:      h_l[inject] = h_l[inject] + x           m_l as for replace
    project:  h_l[inject] = x          m_l = a learned linear map (identity-initialised when d == H)

Layer 0 is the embedding: the prefix of `inputs_embeds` carries the vector. A layer l > 0 (the
input of block l, numbered as output_hidden_states) is reached by a forward pre-hook on block l that
edits only the `<INJECT>` column of passes that contain it: the prefix pass of sampling (the KV
cache then holds the edited keys and values, so every later token attends to them) and the
teacher-forced pass that re-scores sampled tokens. Decode steps (one new position) are left alone.
Hooks are registered for the duration of one call and removed afterwards, also on an exception.
"""

import json
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from pydantic import Field, field_validator
from safetensors.torch import load_file
from torch import nn

from latentlab.common.config import Config
from latentlab.lm.capture import body_states, decoder_blocks, edit_block_input
from latentlab.lm.modeling import load_lm, save_lm, save_weights, write_manifest
from latentlab.lm.padding import pad_sequences
from latentlab.lm.sampling import Completions
from latentlab.lm.tokenizer import INJECT
from latentlab.policies.lm_policy import LMPolicy, Rollout

WEIGHTS, CONFIG = "nla_injector.safetensors", "nla_actor.json"


class NLAActorConfig(Config):
    template: str = f"{INJECT}\n"
    """The actor's prompt: exactly one <INJECT> (where the vector goes) and at least one other token."""
    mode: Literal["replace", "add", "project"] = "replace"
    """How the vector enters at <INJECT>: replace the state, add to it, or replace it by a learned projection."""
    layers: list[int] = Field(default_factory=lambda: [0], min_length=1)
    """Where it enters: 0 the embedding, l > 0 the input of block l (a forward hook), as output_hidden_states."""
    injection_scale: float | None = Field(None, gt=0)
    """L2 norm of the injected vector at every layer (null: measured per layer, the mean norm of the
    model's states there over the training texts; at layer 0 the mean norm of the token embeddings)."""
    center: bool = True
    """Subtract the training mean before normalising: pooled states share a large common direction
    (cos ~0.97 to the mean here), which would leave the actor nearly the same input for every row."""

    @field_validator("layers")
    @classmethod
    def _distinct(cls, layers):
        if len(set(layers)) != len(layers) or min(layers) < 0:
            raise ValueError(f"layers must be distinct and >= 0 (0: the embedding), got {layers}")
        return layers


def unit(x: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """x / ||x|| along the last axis."""
    return x / x.norm(dim=-1, keepdim=True).clamp(min=eps)


class VectorInjector(nn.Module):
    """The vector -> what is written at <INJECT> of each injection layer (the formula in the module docstring)."""

    def __init__(self, dim: int, hidden_size: int, cfg: NLAActorConfig, scales: list[float], mean: torch.Tensor):
        super().__init__()
        self.dim, self.hidden_size, self.cfg = dim, hidden_size, cfg
        self.register_buffer("mean", mean.float().clone() if cfg.center else torch.zeros(dim))
        self.register_buffer("scales", torch.tensor(scales, dtype=torch.float32))
        maps = {}
        for layer in cfg.layers:
            if cfg.mode != "project" and dim == hidden_size:
                maps[str(layer)] = nn.Identity()
            else:
                maps[str(layer)] = nn.Linear(dim, hidden_size, bias=False)
                if dim == hidden_size:
                    nn.init.eye_(maps[str(layer)].weight)
        self.maps = nn.ModuleDict(maps)

    def forward(self, vectors: torch.Tensor, layer: int) -> torch.Tensor:
        """`(B, d)` vectors -> `(B, H)` states of norm scales[layer]."""
        i = self.cfg.layers.index(layer)
        return self.scales[i] * unit(self.maps[str(layer)](unit(vectors.float() - self.mean)))


@torch.no_grad()
def measure_scales(model, tokenizer, layers: list[int], texts: list[str], batch_size: int = 64) -> list[float]:
    """Mean L2 norm of the model's states at each layer over the real tokens of `texts`.

    `batch_size` texts per pass of the decoder body (lm/capture.py `body_states`: no LM head, no logits, no
    block above the highest layer), so memory is bounded by one batch whatever the number of texts. Every
    token's norm is kept (one float per token) and averaged once at the end: the same reduction as one pass
    over every text."""
    tokens = tokenizer(texts, add_special_tokens=False)["input_ids"]
    device = next(model.parameters()).device
    norms: list[list[torch.Tensor]] = [[] for _ in layers]
    for lo in range(0, len(tokens), batch_size):
        ids, mask = pad_sequences(tokens[lo : lo + batch_size], tokenizer.pad_token_id, False)
        real = mask.bool().to(device)
        states = body_states(model, layers, ids.to(device), mask.to(device))
        for kept, state in zip(norms, states, strict=True):
            kept.append(state[real].float().norm(dim=-1))
    return [torch.cat(kept).mean().item() for kept in norms]


class NLAActor(LMPolicy):
    """An LMPolicy whose prompts are activation vectors `(d,)`; everything else is the shared LMPolicy path."""

    TRAINS = ("model", "injector")  # the injection map may have no parameters: then only the model is wrapped

    def __init__(self, model, tokenizer, injector: VectorInjector):
        super().__init__(model, tokenizer)
        self.injector = injector.to(self.device)
        cfg = injector.cfg
        ids = tokenizer(cfg.template, add_special_tokens=False)["input_ids"]
        inject_id = tokenizer.convert_tokens_to_ids(INJECT)
        if ids.count(inject_id) != 1 or len(ids) < 2:
            raise ValueError(f"template {cfg.template!r} must hold exactly one {INJECT} and at least one other token")
        self.template_ids, self.column = torch.tensor(ids), ids.index(inject_id)
        blocks, _ = decoder_blocks(model)
        self._blocks = blocks
        if max(cfg.layers) >= len(blocks):
            raise ValueError(f"injection layers {cfg.layers} must be below the number of blocks ({len(blocks)})")

    def encode(self, prompts: list) -> Rollout:
        vectors = torch.stack([torch.as_tensor(v, dtype=torch.float32) for v in prompts]).to(self.device)
        ids = self.template_ids.to(self.device).expand(len(prompts), -1)
        return Rollout(ids, torch.ones_like(ids), completions=None, texts=[], extras={"vector": vectors})

    def _edit(self, states: torch.Tensor, vectors: torch.Tensor, layer: int) -> torch.Tensor:
        """`states` with only the <INJECT> column replaced (a new tensor: autograd sees the edit)."""
        c = self.column
        # the injector is called (not a method of it): under torchrun `self.injector` is its DDP wrapper
        x = self.injector(vectors, layer).to(states.dtype)
        new = states[:, c] + x if self.injector.cfg.mode == "add" else x
        return torch.cat([states[:, :c], new[:, None], states[:, c + 1 :]], dim=1)

    def prefix(self, rollout: Rollout) -> tuple[torch.Tensor, torch.Tensor]:
        embeds, mask = super().prefix(rollout)
        if 0 in self.injector.cfg.layers:
            embeds = self._edit(embeds, rollout.extras["vector"], 0)
        return embeds, mask

    @contextmanager
    def hooks(self, vectors: torch.Tensor):
        """Edits of the blocks' inputs at the injection layers above the embedding, for one call."""
        width = len(self.template_ids)

        def make(layer: int):
            def edit(states: torch.Tensor, positions: torch.Tensor | None) -> torch.Tensor | None:
                # only a pass over the template itself (it starts at position 0) holds <INJECT>: a decode step
                # or the completions of a shared-prefix pass continue a KV cache that has it already
                if states.shape[1] < width or (positions is not None and int(positions[0, 0]) != 0):
                    return None
                return self._edit(states, vectors, layer)

            return edit

        with ExitStack() as stack:
            for layer in self.injector.cfg.layers:
                if layer > 0:
                    stack.enter_context(edit_block_input(self.model, layer, make(layer)))
            yield

    def rollout(self, prompts: list, sampling, generator: torch.Generator | None = None, group_size: int = 1):
        vectors = self.encode(prompts).extras["vector"]
        with self.hooks(vectors):
            return super().rollout(prompts, sampling, generator, group_size)

    def logprobs(self, rollout: Rollout, temperature: float) -> torch.Tensor:
        # the prefix pass runs on one row per group (LMPolicy.logprobs): the hooks edit those rows
        with self.hooks(rollout.extras["vector"][:: rollout.group_size]):
            return super().logprobs(rollout, temperature)

    def teacher_forced(self, vectors: list, texts: list[str]) -> Rollout:
        """A rollout whose completions are the given texts (+ end-of-sequence), for the supervised loss."""
        rollout = self.encode(vectors)
        tokens = self.tokenizer(texts, add_special_tokens=False)["input_ids"]
        ids, mask = pad_sequences(
            [t + [self.tokenizer.eos_token_id] for t in tokens], self.tokenizer.pad_token_id, False
        )
        rollout.completions = Completions(
            ids.to(self.device), mask.bool().to(self.device), torch.zeros(ids.shape, device=self.device)
        )
        rollout.texts = list(texts)
        return rollout

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in [*self.model.parameters(), *self.injector.parameters()] if p.requires_grad]

    def train(self, mode: bool = True) -> None:
        self.model.train(mode)
        self.injector.train(mode)


def build_actor(model, tokenizer, cfg: NLAActorConfig, vectors: np.ndarray, texts: list[str]) -> NLAActor:
    """An actor on `model`; the centring mean comes from `vectors`, measured scales from `texts`."""
    hidden = model.config.hidden_size
    if cfg.injection_scale is not None:
        scales = [cfg.injection_scale] * len(cfg.layers)
    else:
        scales = measure_scales(model, tokenizer, cfg.layers, texts)
        if 0 in cfg.layers:  # the embedding: the mean norm of the vocabulary's rows
            scales[cfg.layers.index(0)] = (
                model.get_input_embeddings().weight.detach().float().norm(dim=-1).mean().item()
            )
    mean = torch.tensor(np.array(vectors, dtype=np.float32)).mean(0)
    return NLAActor(model, tokenizer, VectorInjector(vectors.shape[1], hidden, cfg, scales, mean))


def save_actor(actor: NLAActor, directory: Path, **provenance) -> str:
    """The model as a Hugging Face directory + the injector (safetensors + JSON) + a manifest over all of them."""
    directory.mkdir(parents=True, exist_ok=True)
    save_lm(actor.model, actor.tokenizer, directory)
    injector = actor.injector
    save_weights(injector, directory / WEIGHTS)
    config = {"dim": injector.dim, "hidden_size": injector.hidden_size, "actor": injector.cfg.model_dump()}
    (directory / CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return write_manifest(directory, **provenance)


def load_actor(directory: str | Path, device: torch.device | str = "cpu", dtype: torch.dtype | None = None) -> NLAActor:
    """The saved actor: its model (weights in `dtype`, default float32) and its injection map."""
    directory = Path(directory)
    config = json.loads((directory / CONFIG).read_text())
    model, tokenizer = load_lm(directory, device, dtype)
    cfg = NLAActorConfig.model_validate(config["actor"])
    state = load_file(directory / WEIGHTS)
    injector = VectorInjector(config["dim"], config["hidden_size"], cfg, state["scales"].tolist(), state["mean"])
    injector.load_state_dict(state)
    return NLAActor(model, tokenizer, injector)
