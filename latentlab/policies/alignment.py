"""Alignment of an injector before GRPO (xRAG's self-distillation): the model with the virtual token
should answer as the same frozen model without it.

    p_t = softmax(logits of the model on [prompt, answer])            the teacher: no virtual token
    q_t = softmax(logits of the policy on [prompt, v, answer])        the student: with it (gated: edited)
    loss = mean over answer tokens t (and <eos>) of KL(p_t || q_t) = sum_v p_t(v) (log p_t(v) - log q_t(v))

teacher-forced on training problems' gold answers; only the injector trains (the model is frozen).
"""

from collections.abc import Callable

import torch

from latentlab.common.optim import build_optimizer, check_finite
from latentlab.common.tracking import StepLog, progress
from latentlab.lm.padding import pad_sequences
from latentlab.lm.sampling import Completions, teacher_forced_logits
from latentlab.policies.injection import InjectionPolicy
from latentlab.policies.lm_policy import Rollout


def answer_kl(teacher_logits: torch.Tensor, student_logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over the masked positions of KL(p || q), p = softmax(teacher), q = softmax(student); `(B, T, V)`."""
    log_p = torch.log_softmax(teacher_logits.float(), dim=-1)
    log_q = torch.log_softmax(student_logits.float(), dim=-1)
    kl = (log_p.exp() * (log_p - log_q)).sum(-1)  # (B, T)
    mask = mask.float()
    return (kl * mask).sum() / mask.sum().clamp(min=1.0)


def answer_rollout(policy: InjectionPolicy, prompts: list[str], answers: list[str]) -> Rollout:
    """A rollout whose completions are the gold answers + <eos>, with the policy's prepared states."""
    rollout = policy.encode(prompts)
    policy.prepare(rollout)
    tokens = policy.prompt_format.encode_answers(policy.tokenizer, prompts, answers)  # answer + end of sequence
    ids, mask = pad_sequences(tokens, policy.tokenizer.pad_token_id, False)
    ids, mask = ids.to(policy.device), mask.bool().to(policy.device)
    rollout.completions, rollout.texts = Completions(ids, mask, torch.zeros(ids.shape, device=policy.device)), answers
    return rollout


def alignment_loss(policy: InjectionPolicy, rollout: Rollout) -> torch.Tensor:
    """KL(model without the virtual token || policy with it) over the answer tokens (module docstring)."""
    with torch.no_grad():
        embeds = policy.model.get_input_embeddings()(rollout.prompt_ids)
        teacher = teacher_forced_logits(policy.model, embeds, rollout.prompt_mask, rollout.completions)
    return answer_kl(teacher, policy.completion_logits(rollout), rollout.completions.mask)


def align_injector(
    policy: InjectionPolicy,
    batches: Callable[[], tuple[list[str], list[str]]],
    steps: int,
    lr: float,
    max_grad_norm: float,
    log: StepLog,
) -> dict[str, float]:
    """`steps` AdamW steps on `alignment_loss` (cosine schedule, no warm-up) over (prompts, answers) batches;
    -> the last step's KL (wall time would make a hashed output differ run to run)."""
    params = policy.trainable_parameters()
    optimizer, schedule = build_optimizer(params, lr, steps)
    policy.train(True)
    kl = float("nan")
    for step in progress(range(steps), "align"):
        loss = alignment_loss(policy, answer_rollout(policy, *batches()))
        check_finite(loss, step)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
        optimizer.step()
        schedule.step()
        kl = loss.item()
        log.log(step, kl=kl, grad_norm=float(grad_norm), lr=schedule.get_last_lr()[0])
    policy.train(False)
    return {"align_final_kl": kl}
