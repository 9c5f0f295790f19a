"""Supervised causal-LM training, shared by pretraining (`base`) and fine-tuning (`sft`).

One loss: next-token cross-entropy on the positions a mask selects. Pretraining selects every
real token; SFT selects the answer and its end-of-sequence token only, so the model is never
trained to reproduce the prompt.
"""

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from pydantic import Field

from latentlab.common.batches import epoch_batches
from latentlab.common.config import Config
from latentlab.common.distributed import ONE_PROCESS, Shards
from latentlab.common.execution import ONE, Execution, Holder, Learner, Loop, Loss, Term, Throughput, fit, logged
from latentlab.common.tracking import StepLog
from latentlab.lm.padding import pad_sequences
from latentlab.lm.prompt_format import RAW, PromptFormat


class LMTrainConfig(Config):
    steps: int = Field(gt=0)
    """Optimizer steps."""
    batch_size: int = Field(gt=0)
    """Sequences per step."""
    lr: float = Field(gt=0)
    """Peak AdamW learning rate."""
    warmup_steps: int = Field(0, ge=0)
    """Linear warm-up steps before the cosine decay."""
    weight_decay: float = Field(0.0, ge=0)
    """AdamW weight decay."""
    max_grad_norm: float = Field(1.0, gt=0)
    """Gradient clipping threshold (global L2 norm)."""
    log_every: int = Field(10, gt=0)
    """Write a log row every this many steps."""


@dataclass
class TokenBatch:
    input_ids: torch.Tensor  # (B, T) right-padded
    attention_mask: torch.Tensor  # (B, T) 1 for real tokens
    loss_mask: torch.Tensor  # (B, T) 1 where the token is a training target

    def to(self, device) -> "TokenBatch":
        return TokenBatch(self.input_ids.to(device), self.attention_mask.to(device), self.loss_mask.to(device))

    def target_count(self) -> torch.Tensor:
        """Tokens predicted in the loss (a target after the first position): the denominator of its mean."""
        return (self.loss_mask[:, 1:] * self.attention_mask[:, 1:]).float().sum()


def collate(sequences: Sequence[list[int]], targets: Sequence[list[int]], pad_id: int) -> TokenBatch:
    """Right-pad token lists into a batch; `targets` marks (1/0) which tokens are trained on."""
    ids, attention = pad_sequences(sequences, pad_id, left=False)
    loss, _ = pad_sequences(targets, 0, left=False)
    return TokenBatch(ids, attention, loss)


def lm_examples(tokenizer, texts: Sequence[str]) -> tuple[list[list[int]], list[list[int]]]:
    """Pretraining examples: every token of each text is a target."""
    ids = tokenizer(list(texts), add_special_tokens=False)["input_ids"]
    return ids, [[1] * len(seq) for seq in ids]


def prompt_answer_examples(
    tokenizer, prompts: Sequence[str], answers: Sequence[str], prompt_format: PromptFormat = RAW
):
    """SFT examples `prompt + answer + <eos>` (chat format: the template's prompt, then its assistant turn up to
    the end of the turn); only the answer and its end are targets.

    Prompt and answer are tokenized apart and concatenated, so the boundary is exact whatever the
    tokenizer would merge across it.
    """
    prompt_ids = prompt_format.encode(tokenizer, prompts)
    answer_ids = prompt_format.encode_answers(tokenizer, prompts, answers)
    sequences, targets = [], []
    for p, a in zip(prompt_ids, answer_ids, strict=True):
        sequences.append(p + a)
        targets.append([0] * len(p) + [1] * len(a))
    return sequences, targets


def shuffled_batches(
    examples, batch_size: int, pad_id: int, generator: torch.Generator, shards: Shards = ONE_PROCESS
) -> Iterator[TokenBatch]:
    """Endless batches, reshuffled every epoch by `generator` (so the order is seeded).

    Every rank draws the same global batch of `batch_size` rows and keeps its own shard of them.
    """
    sequences, targets = examples
    if not sequences:
        raise ValueError("no training examples")
    for rows in epoch_batches(len(sequences), batch_size, generator):
        (rows,) = shards.split(rows, "batch_size")  # all of them with one process
        yield collate([sequences[i] for i in rows], [targets[i] for i in rows], pad_id)


def masked_lm_sums(logits: torch.Tensor, batch: TokenBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed cross-entropy of predicting token t+1 from logits at t over target tokens, number of targets)."""
    targets = batch.input_ids[:, 1:]
    weights = (batch.loss_mask[:, 1:] * batch.attention_mask[:, 1:]).float()
    ce = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), targets.flatten(), reduction="none")
    return (ce.view_as(targets) * weights).sum(), weights.sum()


def masked_lm_loss(logits: torch.Tensor, batch: TokenBatch) -> torch.Tensor:
    """Mean cross-entropy of predicting token t+1 from logits at t, over target tokens only."""
    total, count = masked_lm_sums(logits, batch)
    return total / count.clamp(min=1.0)


def train_lm(
    model: torch.nn.Module,
    batches: Iterator[TokenBatch],
    cfg: LMTrainConfig,
    log: StepLog,
    desc: str,
    *,
    execution: Execution = ONE,
) -> Learner:
    """Minimise `masked_lm_loss` for `cfg.steps` AdamW steps (the parameters that require grad); rows go to `log`
    every `log_every`.

    Under torchrun (`execution`: one shard per rank, `batches` yielding this rank's shard) the loss is the mean
    over the target tokens of the whole global batch (the execution layer's normalisation); the logged loss and
    tokens_per_s are global too. Returns the learner (`Learner.whole` before saving under fsdp).
    """
    if cfg.batch_size % execution.shards.count:
        raise ValueError(
            f"{desc}.batch_size ({cfg.batch_size}) is not divisible by the {execution.shards.count} processes"
        )
    net = Holder(model)
    learner = Learner(
        [(net, "module")],
        lambda: [p for p in model.parameters() if p.requires_grad],
        lr=cfg.lr,
        steps=cfg.steps,
        warmup_steps=cfg.warmup_steps,
        weight_decay=cfg.weight_decay,
        max_grad_norm=cfg.max_grad_norm,
        execution=execution,
    )
    device = next(model.parameters()).device
    throughput, tokens = Throughput(), 0

    def loss(batch: TokenBatch) -> Loss:
        logits = net.module(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        total, _ = masked_lm_sums(logits, batch)
        return Loss({"lm": Term(total, "targets")})

    def step(i: int) -> dict[str, float]:
        nonlocal tokens
        batch = next(batches).to(device)
        row = learner.update([batch], loss=loss, counts=lambda b: {"targets": b.target_count()}, step=i)
        learner.step_schedule()
        tokens += int(batch.attention_mask.sum())
        if not logged(i, cfg.steps, cfg.log_every):
            return row
        return {
            **row,
            "lr": learner.lr,
            "tokens_per_s": int(learner.all_sum(torch.tensor(tokens))) / throughput.elapsed(),
            "seconds_per_step": throughput.seconds_per_step(i),  # since the last row (speed: <name>_speed.csv)
        }

    model.train()
    fit(cfg.steps, step, Loop(log=log, desc=desc, log_every=cfg.log_every), execution, [learner])
    model.eval()
    return learner  # its `whole()` gathers a sharded model to be saved
