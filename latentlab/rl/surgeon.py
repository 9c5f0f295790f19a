"""The attention surgeon: an agent that nudges attention heads, judged inside a SurgicalTheater.

One surgical step (a one-step decision, a contextual bandit):
    state   s = [mean over probe problems of the final-norm hidden state pooled over prompt positions (H),
                 mean negative log-likelihood of the correct answers (1)]       -> (H + 1,), unedited model
    action  a in [-1, 1]^(targets x heads), the agent's tanh-squashed output
    edit    head h of target i is scaled by 1 + max_scale * a[i, h]  (a nudge: never below 1 - max_scale,
            never above 1 + max_scale; the weights keep their direction, nothing is overwritten)
    reward  r = quality(edited) - quality(unedited) on the same probe, quality = mean over problems of
            log p(answer + <eos> | prompt) (nats); the agent learns from reward_scale * r
The edit is undone on leaving the theater unless committing is allowed (the joint phase) and
r > commit_threshold. `Surgeon(agent=None)` is the control that acts uniformly at random.

The agent is SAC in bandit mode (gamma = 0, see latentlab/rl/sac.py): the reward of an edit is
measured completely on the spot, and an uncommitted edit leaves no trace on the next state. When an
edit is committed the next state does change, but by an amount the reward already measured; a
bootstrapped value would credit the edit with GRPO's later progress, which is not the edit's doing.
"""

import json
import time
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import torch
from pydantic import Field
from safetensors.torch import load_file

from latentlab.common.config import Config
from latentlab.common.execution import ONE, Execution, Learner, Loop
from latentlab.common.tracking import progress
from latentlab.lm.capture import LayerCapture
from latentlab.lm.modeling import save_weights
from latentlab.lm.padding import pad_sequences
from latentlab.lm.prompt_format import RAW, PromptFormat
from latentlab.lm.sampling import Completions, completion_logprobs, tokenize_prompts
from latentlab.lm.surgery import PROJECTIONS, Projection, SurgicalTheater, attention_targets, scale_heads
from latentlab.rl.sac import SAC, SACConfig


class SurgeonConfig(Config):
    layers: list[int] | None = None
    """Decoder blocks operated on (0..L-1, negatives count from the end; null: every block)."""
    projections: list[Projection] = Field(default_factory=lambda: list(PROJECTIONS), min_length=1)
    """Attention projections edited, among q, k, v, o. Any layout `latentlab.lm.surgery` knows (separate or fused
    q/k/v); on a model that normalises q/k per head after the projection (Qwen3's q_norm/k_norm) a q or k edit would
    be normalised away, so q and k are refused there with an error naming the norm: choose [v, o]."""
    max_scale: float = Field(0.1, gt=0, lt=1)
    """Largest relative change of a head: factors lie in [1 - max_scale, 1 + max_scale]."""
    probe_size: int = Field(128, gt=0)
    """Problems in the probe batch that measures the state and the reward (drawn afresh each step)."""
    reward_scale: float = Field(100.0, gt=0)
    """The agent learns from reward_scale * r (r is a difference of mean log-likelihoods, in nats)."""
    commit_threshold: float = 0.0
    """In the joint phase, an edit whose reward r exceeds this (nats per problem) is kept."""


@torch.no_grad()
def probe(
    model, tokenizer, prompts: Sequence[str], answers: Sequence[str], prompt_format: PromptFormat = RAW
) -> tuple[torch.Tensor, float]:
    """(state features `(H + 1,)`, quality): one teacher-forced pass over `prompt + answer + <eos>` (as
    `prompt_format` writes them)."""
    device = next(model.parameters()).device
    ids, mask = tokenize_prompts(tokenizer, list(prompts), device, prompt_format)
    answer_ids = prompt_format.encode_answers(tokenizer, prompts, answers)
    completion_ids, completion_mask = pad_sequences(answer_ids, tokenizer.pad_token_id, left=False)
    completions = Completions(completion_ids.to(device), completion_mask.bool().to(device), logprobs=None)
    with LayerCapture(model, [-1]) as capture:
        logprobs = completion_logprobs(model, model.get_input_embeddings()(ids), mask, completions)  # (B, T)
        hidden = capture.states[capture.layers[0]][:, : ids.shape[1]]  # (B, P, H): prompt positions
    weights = mask[..., None].to(hidden.dtype)
    pooled = (hidden * weights).sum(1) / weights.sum(1)  # (B, H)
    log_likelihood = logprobs.sum(1)  # (B,): log p(answer + eos | prompt)
    quality = log_likelihood.mean()
    return torch.cat([pooled.mean(0), -quality[None]]).float().cpu(), quality.item()


class Surgeon:
    """Proposes an edit, measures it in a SurgicalTheater, learns (SAC) and maybe commits it.

    Under torchrun (`execution.shards`) the probe batch is cut into shards like a GRPO batch: each rank probes its
    shards, and the state and quality are the means over the shards, all-reduced, so every rank sees the same
    global state and reward. Every rank keeps an identical replica of the agent (same seeded stream, same
    inputs, same updates), so every rank draws the same action and commits the same edit on its copy of the
    model (under fsdp: on its rows of each sharded weight, `latentlab.lm.surgery`), where the edit's relative norm
    is summed over the shards (a collective too). One process given N shards reproduces N ranks.
    """

    def __init__(
        self,
        model,
        tokenizer,
        cfg: SurgeonConfig,
        agent: SAC | None,
        generator: torch.Generator,
        *,
        execution: Execution = ONE,
        prompt_format: PromptFormat = RAW,
    ):
        self.model, self.tokenizer, self.cfg, self.agent, self.generator = model, tokenizer, cfg, agent, generator
        self.shards, self.prompt_format = execution.shards, prompt_format
        self.targets = attention_targets(model, cfg.layers, cfg.projections)
        self.heads = max(t.heads for t in self.targets)
        self.commits = 0

    @property
    def action_dim(self) -> int:
        return len(self.targets) * self.heads

    @staticmethod
    def build_agent(model, cfg: SurgeonConfig, sac: SACConfig, generator: torch.Generator) -> SAC:
        targets = attention_targets(model, cfg.layers, cfg.projections)
        hidden = model.get_input_embeddings().weight.shape[1]
        return SAC(hidden + 1, len(targets) * max(t.heads for t in targets), sac, generator)

    def act(self, state: torch.Tensor) -> torch.Tensor:
        if self.agent is None:  # the control: uniform on [-1, 1]^A, from the same kind of stream
            return torch.rand(self.action_dim, generator=self.generator) * 2 - 1
        return self.agent.act(state)

    def probe(self, prompts: Sequence[str], answers: Sequence[str]) -> tuple[torch.Tensor, float]:
        """`probe` of the whole (global) probe batch: the mean over its shards of each shard's probe."""
        shards = self.shards
        if shards.single:
            return probe(self.model, self.tokenizer, prompts, answers, self.prompt_format)
        parts = [
            probe(self.model, self.tokenizer, p, a, self.prompt_format)
            for p, a in zip(shards.split(prompts, "surgery.probe_size"), shards.split(answers, "surgery.probe_size"))
        ]
        local = sum(
            torch.cat([state.double(), torch.tensor([quality], dtype=torch.float64)]) for state, quality in parts
        )
        device = next(self.model.parameters()).device  # nccl reduces GPU tensors
        total = (shards.sum(local.to(device)) / shards.count).cpu()
        return total[:-1].float(), total[-1].item()

    def step(self, prompts: Sequence[str], answers: Sequence[str], may_commit: bool) -> dict[str, float]:
        """One edit: measure, learn, and keep it if allowed and good enough; returns the log row."""
        started = time.perf_counter()
        state, before = self.probe(prompts, answers)
        action = self.act(state)  # (A,) in [-1, 1]
        factors = 1 + self.cfg.max_scale * action.view(len(self.targets), self.heads)
        with SurgicalTheater(self.model, self.targets) as theater:
            scale_heads(self.targets, factors)
            _, after = self.probe(prompts, answers)
            reward = after - before
            relative_change = theater.relative_change()
            if may_commit and reward > self.cfg.commit_threshold:
                theater.commit()
        committed = theater.committed
        self.commits += committed
        row = {
            "surgery_reward": reward,
            "probe_log_likelihood": before,
            "action_magnitude": action.abs().mean().item(),
            "edit_relative_norm": relative_change,
            "committed": float(committed),
            "commits": float(self.commits),
        }
        if self.agent is not None:
            # bandit transition: next state = state, done = True (never bootstrapped with gamma = 0)
            row |= self.agent.observe(state, action, self.cfg.reward_scale * reward, state, done=True)
            row["alpha"] = self.agent.alpha
        row["seconds_per_surgery"] = time.perf_counter() - started  # a speed column: plots/<stage>_speed.csv
        return row


PHASES = {1: "bootstrap (GRPO only)", 2: "surgery only", 3: "joint"}


@dataclass(frozen=True, kw_only=True)
class Curriculum:
    """What `run_curriculum` runs: one step per entry of `phases`, numbered from `first_step`."""

    phases: Sequence[int]
    """1: a GRPO step; 2: a surgical step, nothing committed; 3: a GRPO step then a surgical step that may commit."""
    first_step: int = 0
    next_batch: Callable[[], tuple[list[str], list]]
    """The GRPO batches (prompts, targets)."""
    next_probe: Callable[[], tuple[list[str], list[str]]] | None = None
    """The surgeon's probe batches (prompts, answers); None: no surgery."""


def run_curriculum(
    trainer, surgeon: Surgeon | None, curriculum: Curriculum, loop: Loop, learners: Sequence[Learner] = ()
) -> None:
    """The steps of `curriculum` (GRPO by `trainer`, surgery by `surgeon`); held-out `loop.evaluate` every
    `loop.eval_every` steps and at the last one (`evaluate=None`: never, as on the ranks but 0 under torchrun).
    `surgeon=None` skips the surgery (the GRPO-only control). Where `learners` shard a module (fsdp) every rank
    enters their `scoring` mode at those steps (it gathers the weights: a collective), and the ranks that evaluate
    do so there, where a forward is no collective."""
    everywhere = any(learner.sharded for learner in learners)
    bar = progress(curriculum.phases, loop.desc)
    loop.log.bar = bar
    last = curriculum.first_step + len(curriculum.phases) - 1
    for step, phase in enumerate(bar, start=curriculum.first_step):
        row: dict[str, float] = {"phase": float(phase)}
        if phase in (1, 3):
            row |= trainer.step(step, *curriculum.next_batch())
        if phase in (2, 3) and surgeon is not None:
            row |= surgeon.step(*curriculum.next_probe(), may_commit=phase == 3)
        if loop.eval_every and (step % loop.eval_every == 0 or step == last):
            if everywhere:
                with ExitStack() as stack:
                    for learner in learners:
                        stack.enter_context(learner.scoring())
                    row |= loop.evaluate() if loop.evaluate is not None else {}
            elif loop.evaluate is not None:
                row |= loop.evaluate()
        loop.log.log(step, **row)


AGENT_WEIGHTS, AGENT_CONFIG = "surgeon.safetensors", "surgeon.json"


def save_surgeon(surgeon: Surgeon, sac: SACConfig, directory: Path) -> None:
    """surgeon.safetensors (the SAC agent's tensors) + surgeon.json (its shape, configs and targets)."""
    directory.mkdir(parents=True, exist_ok=True)
    save_weights(surgeon.agent, directory / AGENT_WEIGHTS)
    config = {
        "obs_dim": surgeon.agent.obs_dim,
        "action_dim": surgeon.agent.action_dim,
        "targets": [t.name for t in surgeon.targets],
        "heads": surgeon.heads,
        "commits": surgeon.commits,
        "surgeon": surgeon.cfg.model_dump(),
        "sac": sac.model_dump(),
    }
    (directory / AGENT_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def load_surgeon_agent(directory: Path, generator: torch.Generator) -> SAC:
    """The saved SAC agent (to act or to keep learning)."""
    config = json.loads((directory / AGENT_CONFIG).read_text())
    agent = SAC(config["obs_dim"], config["action_dim"], SACConfig.model_validate(config["sac"]), generator)
    agent.load_state_dict(load_file(directory / AGENT_WEIGHTS))
    return agent
