"""How a training stage runs its trainer (latentlab/common/execution.py), and the LM it fine-tunes.

Sampling stages (grpo, inject, surgery, nla_rl) cut each batch into `launcher.shards` shards, each with its own
sampling stream, so one process given N shards reproduces N processes. Supervised stages (base, sft, nla_sft,
policy) cut it into one shard per process: one process is their reference. `launcher.strategy` spreads the
trainable modules over the processes: replicated (ddp) or sharded (fsdp).

The LM a stage fine-tunes is loaded as `model` and `gpu` say: its weights in `model.dtype`, LoRA adapters when
`model.adapter` is lora (only they train), HF activation checkpointing when `gpu.gradient_checkpointing`.
"""

from pathlib import Path

from latentlab.common.distributed import Shards
from latentlab.common.execution import Execution
from latentlab.common.precision import enable_gradient_checkpointing, weight_dtype
from latentlab.lm.adapters import add_lora, merged, save_adapter, trained_parameters
from latentlab.lm.modeling import load_lm
from stages.common import Run
from stages.params import Params


def sampling(run: Run, params: Params) -> Execution:
    """A sampling stage's execution: `run.shards` (launcher.shards), one sampling stream each."""
    return Execution(shards=run.shards, strategy=params.launcher.strategy)


def supervised(run: Run, params: Params) -> Execution:
    """A supervised stage's execution: one shard per process."""
    return Execution(shards=Shards(run.ranks.world, run.ranks), strategy=params.launcher.strategy)


def load_trained_lm(params: Params, path: Path, run: Run, adapters: bool = True):
    """(model, tokenizer) from `path`, as the stage trains it (`fine_tuned`), its weights in `model.dtype`."""
    model, tokenizer = load_lm(path, run.device, dtype=weight_dtype(params.model.dtype))
    return fine_tuned(params, model, adapters), tokenizer


def fine_tuned(params: Params, model, adapters: bool = True):
    """`model` as the stage trains it: LoRA adapters on it (`model.adapter: lora`; not where `adapters` is False,
    as in surgery, whose edits address the plain attention weights), activation checkpointing
    (`gpu.gradient_checkpointing`)."""
    if adapters and params.model.adapter == "lora":
        model = add_lora(model, params.model.lora)
    if params.gpu.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    return model


def plain_weights(model, directory: Path, parent: str | None, **provenance) -> tuple:
    """(the model to save as plain weights, the number of parameters it trained): a LoRA model saves its adapter
    first, into `directory`/adapter with the base's content hash `parent`, then merges into plain weights (which
    consumes it); any other model is returned as it is."""
    count = trained_parameters(model)
    if not hasattr(model, "peft_config"):
        return model, count
    save_adapter(model, directory / "adapter", parent, trained_parameters=count, **provenance)
    return merged(model), count
