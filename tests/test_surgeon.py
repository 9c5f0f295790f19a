"""The surgeon: the probe's log-likelihood by hand, edits bounded and undone unless committed, commits only
when allowed and above the threshold, the curriculum's phases, and the saved agent."""

import copy

import torch

from latentlab.common.execution import Loop
from latentlab.common.tracking import StepLog
from latentlab.rl.sac import SACConfig
from latentlab.rl.surgeon import (
    Curriculum,
    Surgeon,
    SurgeonConfig,
    load_surgeon_agent,
    probe,
    run_curriculum,
    save_surgeon,
)

PROMPTS, ANSWERS = ["1+2=", "10+5=", "7-3="], ["3", "15", "4"]


def test_probe_quality_is_the_answer_log_likelihood(tiny_lm):
    model, tokenizer = tiny_lm
    state, quality = probe(model, tokenizer, PROMPTS, ANSWERS)
    expected = []
    for prompt, answer in zip(PROMPTS, ANSWERS):  # one unpadded sequence at a time, by hand
        ids = tokenizer(prompt + answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        n_prompt = len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
        with torch.no_grad():
            logprobs = model(input_ids=torch.tensor([ids])).logits[0].log_softmax(-1)
        expected.append(sum(logprobs[t - 1, ids[t]].item() for t in range(n_prompt, len(ids))))
    assert abs(quality - sum(expected) / len(expected)) < 1e-4
    assert state.shape == (model.config.hidden_size + 1,) and abs(state[-1].item() + quality) < 1e-6


def surgeon(tiny_lm, agent: bool, **cfg):
    model, tokenizer = copy.deepcopy(tiny_lm[0]), tiny_lm[1]
    config = SurgeonConfig(layers=[-1], max_scale=0.2, **cfg)
    generator = torch.Generator().manual_seed(0)
    sac = Surgeon.build_agent(model, config, SACConfig(learning_starts=2, batch_size=2), generator) if agent else None
    return Surgeon(model, tokenizer, config, sac, generator)


def test_edits_are_bounded_nudges_and_undone_unless_committed(tiny_lm):
    s = surgeon(tiny_lm, agent=True, commit_threshold=-1e9)  # every edit clears the threshold
    before = {k: v.clone() for k, v in s.model.state_dict().items()}
    for _ in range(3):
        row = s.step(PROMPTS, ANSWERS, may_commit=False)
        assert 0 < row["edit_relative_norm"] <= 0.2 and row["committed"] == 0
        assert "alpha" in row
    assert all(torch.equal(v, before[k]) for k, v in s.model.state_dict().items())
    row = s.step(PROMPTS, ANSWERS, may_commit=True)
    assert row["committed"] == 1 and s.commits == 1
    changed = [k for k, v in s.model.state_dict().items() if not torch.equal(v, before[k])]
    assert changed and all("layers.1.self_attn" in k for k in changed)
    _, quality = probe(s.model, s.tokenizer, PROMPTS, ANSWERS)  # the kept edit is the measured one
    assert abs(quality - (row["probe_log_likelihood"] + row["surgery_reward"])) < 1e-5


def test_threshold_blocks_commits_for_the_random_surgeon(tiny_lm):
    s = surgeon(tiny_lm, agent=False, commit_threshold=1e9)
    rows = [s.step(PROMPTS, ANSWERS, may_commit=True) for _ in range(3)]
    assert s.commits == 0 and all("alpha" not in r for r in rows)
    assert len({r["action_magnitude"] for r in rows}) == 3  # random, different each time


def test_curriculum_runs_each_phase(tiny_lm):
    class CountingTrainer:
        steps = 0

        def step(self, step, prompts, targets):
            self.steps += 1
            return {"reward_mean": 0.0}

    s, trainer, log = surgeon(tiny_lm, agent=False, commit_threshold=-1e9), CountingTrainer(), StepLog()
    curriculum = Curriculum(
        phases=[1, 1, 2, 2, 3],
        first_step=10,
        next_batch=lambda: (PROMPTS, ANSWERS),
        next_probe=lambda: (PROMPTS, ANSWERS),
    )
    run_curriculum(
        trainer, s, curriculum, Loop(log=log, desc="test", evaluate=lambda: {"heldout_accuracy": 0.5}, eval_every=2)
    )
    assert trainer.steps == 3 and s.commits == 1  # GRPO in phases 1 and 3; commits only in phase 3
    assert [r["step"] for r in log.rows] == [10, 11, 12, 13, 14]
    assert [r["phase"] for r in log.rows] == [1, 1, 2, 2, 3]
    assert ["heldout_accuracy" in r for r in log.rows] == [True, False, True, False, True]


def test_save_and_load_the_agent(tiny_lm, tmp_path):
    s = surgeon(tiny_lm, agent=True)
    save_surgeon(s, s.agent.cfg, tmp_path)
    loaded = load_surgeon_agent(tmp_path, torch.Generator())
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in s.agent.state_dict().items())
