"""How a training stage runs its trainer (latentlab/common/execution.py), and the LM it fine-tunes.

Sampling stages (grpo, inject, surgery, nla_rl) cut each batch into `launcher.shards` shards, each with its own
sampling stream, so one process given N shards reproduces N processes. Supervised stages (base, sft, nla_sft,
policy) cut it into one shard per process: one process is their reference. `launcher.strategy` spreads the
trainable modules over the processes: replicated (ddp) or sharded (fsdp).

The LM a stage fine-tunes is loaded as `model` and `gpu` say: its weights in `model.dtype`, LoRA adapters when
`model.adapter` is lora (only they train), HF activation checkpointing when `gpu.gradient_checkpointing`.
"""

from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

from latentlab.common.atomic import atomic_output
from latentlab.common.distributed import Shards
from latentlab.common.execution import Execution, Learner
from latentlab.common.precision import enable_gradient_checkpointing, weight_dtype
from latentlab.lm.adapters import add_lora, merged_from, save_adapter, trained_parameters
from latentlab.lm.modeling import load_lm, read_manifest, save_lm
from stages.common import Run
from stages.params import Params


def sampling(run: Run, params: Params) -> Execution:
    """A sampling stage's execution: `run.shards` (launcher.shards), one sampling stream each."""
    return Execution(shards=run.shards, strategy=params.launcher.strategy)


def supervised(run: Run, params: Params) -> Execution:
    """A supervised stage's execution: one shard per process."""
    return Execution(shards=Shards(run.ranks.world, run.ranks), strategy=params.launcher.strategy)


@contextmanager
def whole(*learners: Learner) -> Iterator[None]:
    """Every learner's `whole()` at once: what a stage saves its trained modules in (every rank enters: under fsdp
    the whole weights are gathered to rank 0)."""
    with ExitStack() as stack:
        for learner in learners:
            stack.enter_context(learner.whole())
        yield


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


def plain_weights(params: Params, model, directory: Path, base: Path) -> tuple:
    """(the model to save as plain weights, the number of parameters it trained). A LoRA model saves its adapter
    first, into `directory`/adapter with the content hash of `base` (the model it adapts), and the plain weights
    are `base` reloaded with the adapter merged in: the same weights as merging in memory, and what works under
    fsdp too, where the trained model's blocks are shards. Any other model is returned as it is."""
    count = trained_parameters(model)
    if not hasattr(model, "peft_config"):
        return model, count
    save_adapter(model, directory / "adapter", read_manifest(base).get("content_sha256"), trained_parameters=count)
    plain, _ = load_lm(base, "cpu", dtype=weight_dtype(params.model.dtype))
    return merged_from(plain, directory / "adapter"), count


def save_fine_tuned_lm(params: Params, model, tokenizer, directory: Path, base: Path) -> None:
    """`directory` (atomically): the trained LM as plain weights (a LoRA adapter beside them in adapter/), the
    content hash of `base`, the model it was trained from, in the manifest. Rank 0, inside the learners' `whole()`."""
    with atomic_output(directory) as out:
        model, count = plain_weights(params, model, out, base)
        save_lm(model, tokenizer, out, parent=read_manifest(base).get("content_sha256"), trained_parameters=count)
