"""LoRA adapters (Hu et al. 2021) through the `peft` library: train a low-rank update, keep the base frozen.

A targeted linear layer W (out x in) computes W x + (alpha / r) B A x, with A (r x in) drawn at random from
torch's global RNG (the stage seeds it: the same seed, the same A) and B (out x r) zero, so training starts
from the base model exactly. Only A and B train: r * (in + out) parameters per targeted layer.

    model = add_lora(model, LoRAConfig(rank=8))        # a PeftModel; the base's own weights frozen
    ...train...
    save_adapter(model, out / "adapter", base_sha256)  # PEFT's files + a manifest naming the base
    save_lm(merged(model), tokenizer, out)             # plain weights for the stages downstream

The frozen reference of KL-regularised RL is the same model with its adapters disabled
(`latentlab.policies.adapter.AdapterDisabled`): no second copy of the weights.
"""

import json
from pathlib import Path
from typing import TYPE_CHECKING

from pydantic import Field

from latentlab.common.config import Config
from latentlab.lm.modeling import write_manifest

if TYPE_CHECKING:
    from peft import PeftModel
    from transformers import PreTrainedModel

# peft and transformers are imported inside the functions: the params schema imports LoRAConfig, and every stage
# loads the schema, also those that never touch a model.

ATTENTION_AND_MLP = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
DEFAULT_TARGETS = {
    "llama": ATTENTION_AND_MLP,
    "qwen2": ATTENTION_AND_MLP,
    "qwen3": ATTENTION_AND_MLP,
    "gpt2": ["c_attn", "c_proj", "c_fc"],  # fused qkv, both output projections (attention and MLP), MLP input
}
"""Every linear layer of the attention and the MLP of each block, per `model.config.model_type`: the placement
of the LoRA paper's best results (QLoRA, Dettmers et al. 2023, found all of them needed to match full tuning)."""


class LoRAConfig(Config):
    rank: int = Field(8, gt=0)
    """r: the rank of each update B A; r * (in + out) trained parameters per targeted layer."""
    alpha: float = Field(16.0, gt=0)
    """The update is scaled by alpha / rank, so a change of rank keeps the update's size at initialisation."""
    dropout: float = Field(0.0, ge=0, lt=1)
    """Dropout on the adapter's input while training (0: none, and training stays deterministic)."""
    target_modules: list[str] | None = Field(None, min_length=1)
    """Names (the last part of a module's path) of the linear layers that get an adapter; null: the family's
    default, every attention and MLP projection (llama, qwen2, qwen3, gpt2)."""


def target_modules(model: "PreTrainedModel", cfg: LoRAConfig) -> list[str]:
    """The configured targets, or the default of the model's family; an unknown family needs them spelled out."""
    if cfg.target_modules is not None:
        return list(cfg.target_modules)
    family = getattr(model.config, "model_type", None)
    if family not in DEFAULT_TARGETS:
        raise ValueError(
            f"no default LoRA targets for model_type {family!r} (known: {', '.join(sorted(DEFAULT_TARGETS))}): "
            "set model.lora.target_modules to the names of its linear layers"
        )
    return DEFAULT_TARGETS[family]


def add_lora(model: "PreTrainedModel", cfg: LoRAConfig) -> "PeftModel":
    """`model` with a LoRA adapter on each target layer; only the adapters' A and B require gradients.

    The model is wrapped in place (its targeted layers become peft's LoRA layers): keep no other reference to it
    as the base. GPT-2's layers are transformers' Conv1D, whose weight is stored (in, out): peft is told so
    (fan_in_fan_out) rather than left to guess and warn."""
    from peft import LoraConfig, get_peft_model
    from transformers.pytorch_utils import Conv1D

    targets = target_modules(model, cfg)
    transposed = any(
        isinstance(module, Conv1D) for name, module in model.named_modules() if name.rsplit(".", 1)[-1] in targets
    )
    config = LoraConfig(
        task_type="CAUSAL_LM",
        r=cfg.rank,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=targets,
        fan_in_fan_out=transposed,
    )
    return get_peft_model(model, config)


ADAPTER_CONFIG = "adapter_config.json"


def save_adapter(peft_model: "PeftModel", directory: str | Path, base_sha256: str | None, **provenance) -> str:
    """PEFT's own files (adapter_config.json, adapter_model.safetensors: no pickle; PeftModel.from_pretrained
    reads them) plus latentlab's manifest: their content hash, the content hash of the base model the adapter
    applies to (`base_sha256`) and `provenance`. Returns the content hash.

    peft stores target_modules as a set, which json writes in the process's string-hash order: the list is sorted
    here so that a seed gives the same bytes in every process (a DVC output's hash must not vary)."""
    directory = Path(directory)
    peft_model.save_pretrained(directory, safe_serialization=True)
    config = json.loads((directory / ADAPTER_CONFIG).read_text())
    if isinstance(config.get("target_modules"), list):
        config["target_modules"] = sorted(config["target_modules"])
    (directory / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True))  # peft's own layout
    return write_manifest(directory, base_sha256=base_sha256, **provenance)


def trained_parameters(model) -> int:
    """The number of parameters that train (each shared tensor once): the adapters' alone under LoRA."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def merged(peft_model: "PeftModel") -> "PreTrainedModel":
    """The plain transformers model with every adapter folded into its weights (W + alpha / r B A), for the stages
    downstream that read plain weights. It consumes the PeftModel: its layers are replaced in place by the merged
    plain ones, so save the adapter first and train no further (a copy would double the memory of a large model)."""
    return peft_model.merge_and_unload()


def merged_from(base: "PreTrainedModel", adapter: str | Path) -> "PreTrainedModel":
    """`base` (a plain model, consumed) with the saved adapter at `adapter` folded into its weights."""
    from peft import PeftModel

    return merged(PeftModel.from_pretrained(base, str(adapter)))
