"""Supervised causal-LM training, shared by pretraining (`base`) and fine-tuning (`sft`).

One loss: next-token cross-entropy on the positions a mask selects. Pretraining selects every
real token; SFT selects the answer and its end-of-sequence token only, so the model is never
trained to reproduce the prompt.
"""

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from pydantic import Field

from latentlab.common.batches import epoch_batches
from latentlab.common.config import Config
from latentlab.common.distributed import ONE_PROCESS, Shards, data_parallel
from latentlab.common.optim import build_optimizer, check_finite
from latentlab.common.runtime import autocast
from latentlab.common.tracking import StepLog, progress
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
    model,
    batches: Iterator[TokenBatch],
    cfg: LMTrainConfig,
    device,
    desc: str,
    log: StepLog,
    shards: Shards = ONE_PROCESS,
) -> None:
    """Minimise `masked_lm_loss` for `cfg.steps` AdamW steps; rows go to `log` every `log_every`.

    Under torchrun (`shards`: one per rank, `batches` yielding this rank's shard) the loss is the mean over the
    target tokens of the whole global batch: each rank's summed loss is divided by the all-reduced token count
    and scaled by the world size, so DDP's gradient average is the single-process gradient; the logged loss
    and tokens_per_s are global too.
    """
    if cfg.batch_size % shards.count:
        raise ValueError(f"{desc}.batch_size ({cfg.batch_size}) is not divisible by the {shards.count} processes")
    model.train()
    net = data_parallel(model, shards.ranks)  # the model itself with one process
    optimizer, schedule = build_optimizer(model.parameters(), cfg.lr, cfg.steps, cfg.warmup_steps, cfg.weight_decay)
    tokens, started = 0, time.perf_counter()
    last_step, last_time = -1, started
    bar = progress(range(cfg.steps), desc)
    log.bar = bar
    for step in bar:
        batch = next(batches).to(device)
        with autocast():  # bf16 on a GPU per gpu.precision; nothing on the CPU
            logits = net(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        if shards.single:
            loss = objective = masked_lm_loss(logits, batch)
        else:
            total, count = masked_lm_sums(logits, batch)
            count = shards.sum(count).clamp(min=1.0)  # target tokens of the global batch
            objective = total / count * shards.ranks.world
            loss = shards.sum(total.detach()) / count
        check_finite(loss, step)
        optimizer.zero_grad(set_to_none=True)
        objective.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
        optimizer.step()
        schedule.step()
        tokens += int(batch.attention_mask.sum())
        if step % cfg.log_every == 0 or step == cfg.steps - 1:
            now = time.perf_counter()
            elapsed, seconds_per_step = now - started, (now - last_time) / (step - last_step)
            last_step, last_time = step, now
            log.log(
                step,
                loss=loss.item(),
                grad_norm=float(grad_norm),
                lr=schedule.get_last_lr()[0],
                tokens_per_s=int(shards.sum(torch.tensor(tokens, device=device))) / elapsed,
                seconds_per_step=seconds_per_step,  # since the last row (speed columns go to <name>_speed.csv)
            )
    model.eval()
