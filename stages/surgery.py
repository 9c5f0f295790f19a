"""surgery: three-phase GRPO + SAC attention surgeon from models/sft, against two controls -> models/surgery.

Phase 1 (GRPO only, `grpo` section, learning rate `surgery.lr`) runs once; three arms continue from
its end state (model, optimizer, schedule: `Learner.snapshot()`, restored before each; sampling streams set
afresh from their saved states) with the same prompt, probe and
action streams: `sac` (phase 2: edits measured in the SurgicalTheater and discarded while SAC learns;
phase 3: GRPO steps, each followed by an edit that is kept when its reward clears
`surgery.commit_threshold`), `random` (the same with uniform random edits) and `grpo_only` (the same
GRPO steps, no surgery). -> models/surgery (the sac arm's model + surgeon.safetensors/json),
metrics/surgery.json (each arm's test accuracy and commits), plots/surgery.csv (the sac arm's log),
plots/surgery_arms.csv (the three arms' held-out curves and rewards side by side). Under torchrun
(`launcher`) the GRPO steps split their prompts as `grpo` does and the surgeon splits its probe batch; every
rank keeps an identical replica of the SAC agent (README: Training on several processes, GPUs or nodes). Under
`launcher.strategy: fsdp` the snapshot keeps each rank's shards, and the surgeon edits each rank's rows of them.
"""

import copy
from contextlib import nullcontext

import torch

from latentlab.common.atomic import atomic_output
from latentlab.common.execution import Loop
from latentlab.common.inputs import read_table, require_model_dir
from latentlab.common.tracking import StepLog, write_side_by_side
from latentlab.lm.modeling import read_manifest, save_lm
from latentlab.lm.surgery import attention_targets
from latentlab.policies.lm_policy import LMPolicy
from latentlab.rl.surgeon import Curriculum, Surgeon, run_curriculum, save_surgeon
from latentlab.tasks.arithmetic import PROBLEM_SCHEMA
from latentlab.tasks.evaluation import evaluate_policy
from stages.common import check_layers, require_divisible, setup, stage, step_log, write_json
from stages.execution import load_trained_lm, sampling
from stages.paths import METRICS, MODELS, PLOTS, SYNTH
from stages.recipes import arithmetic_grpo

ARMS = ("sac", "random", "grpo_only")  # the method, then its controls
SIDE_BY_SIDE = ["phase", "heldout_accuracy", "reward_mean", "surgery_reward", "commits"]


@stage(torchrun=True)
def main(params):
    run, cfg, seed, every = setup(params), params.surgery, params.seed, params.grpo.eval_every
    sft = require_model_dir(MODELS / "sft")
    check_layers(params, sft, ("surgery.layers",))
    model, tokenizer = load_trained_lm(params, sft, run, adapters=False)
    try:  # the surgeon's targets on this layout, before any training (Qwen3's q_norm/k_norm refuse q and k)
        attention_targets(model, cfg.surgeon.layers, cfg.surgeon.projections)
    except ValueError as error:
        raise ValueError(f"surgery: {error}") from None
    frozen = copy.deepcopy(model).requires_grad_(False)
    reference = LMPolicy(frozen, tokenizer, params.prompt) if params.grpo.beta > 0 else None
    p1, p2, p3 = cfg.phases
    require_divisible(run, cfg.probe_size, "surgery.probe_size")
    grpo = arithmetic_grpo(params, run, cfg.lr, LMPolicy(model, tokenizer, params.prompt), reference, steps=p1 + p3)
    trainer = grpo.trainer  # every arm's: restored to the phase-1 state before each
    learner, policy = trainer.learner, trainer.policy
    test = read_table(SYNTH / "test.parquet", PROBLEM_SCHEMA)

    def test_scores(name: str) -> dict | None:
        """The test set, scored by rank 0 alone (fsdp: inside every rank's gathered weights); None elsewhere."""
        e = params.evaluate
        with learner.scoring() if learner.sharded else nullcontext():
            if run.leader:
                return evaluate_policy(policy, test, grpo.reward, e.batch_size, e.max_new_tokens, f"test {name}")[0]
        return None

    def loop(log: StepLog, desc: str) -> Loop:  # held-out curves: rank 0 alone (the others wait in a collective)
        return Loop(log=log, desc=desc, evaluate=grpo.monitor(policy) if run.leader else None, eval_every=every)

    log = step_log(params, "surgery", params.model_dump(include={"grpo", "surgery", "seed"}))
    phase_1 = Curriculum(phases=[1] * p1, next_batch=lambda: next(grpo.batches))
    run_curriculum(trainer, None, phase_1, loop(log, "surgery phase 1"), [learner])
    metrics, logs = {"phases": cfg.phases}, {}
    metrics["after_phase_1"] = test_scores("phase 1")
    start, streams = learner.snapshot(), [g.get_state() for g in trainer.generators]
    for arm in ARMS:  # each from the phase-1 state (model, optimizer, schedule, sampler) and the same streams
        learner.restore(start)
        trainer.generators = [torch.Generator(run.device).set_state(state) for state in streams]
        surgeon_rng, model = torch.Generator().manual_seed(seed + 2), policy.model
        # every rank: the same agent, stream and global probe results, hence the same edits (latentlab/rl/surgeon.py)
        agent = Surgeon.build_agent(model, cfg.surgeon, cfg.sac, surgeon_rng) if arm == "sac" else None
        surgeon = (
            None
            if arm == "grpo_only"
            else Surgeon(
                model,
                tokenizer,
                cfg.surgeon,
                agent,
                surgeon_rng,
                execution=sampling(run, params),
                prompt_format=params.prompt,
            )
        )
        logs[arm] = log if arm == "sac" else StepLog()
        logs[arm].rows = logs[arm].rows if arm == "sac" else list(log.rows[:p1])
        curriculum = Curriculum(
            phases=[2] * p2 + [3] * p3,
            first_step=p1,
            next_batch=grpo.stream(params.grpo.prompts_per_step, seed + 3),
            next_probe=grpo.stream(cfg.probe_size, seed + 4, answers=True),
        )
        run_curriculum(trainer, surgeon, curriculum, loop(logs[arm], f"surgery {arm}"), [learner])
        metrics[arm] = {**(test_scores(arm) or {}), "commits": surgeon.commits if surgeon else 0}
        if arm != "sac":
            continue
        with learner.whole():  # fsdp: the whole weights gathered to rank 0 (every rank takes part)
            if run.leader:  # under torchrun rank 0 alone writes the outputs
                with atomic_output(MODELS / "surgery") as out:
                    save_surgeon(surgeon, cfg.sac, out)
                    save_lm(
                        model,
                        tokenizer,
                        out,
                        parent=read_manifest(sft).get("content_sha256"),
                        commits=surgeon.commits,
                        trained_parameters=model.num_parameters(),
                    )
    if not run.leader:
        return
    for control in ARMS[1:]:
        metrics[f"sac_minus_{control}"] = metrics["sac"]["accuracy"] - metrics[control]["accuracy"]
    write_json(METRICS / "surgery.json", metrics)
    log.save(PLOTS / "surgery.csv")  # and plots/surgery_speed.csv
    write_side_by_side({arm: arm_log.rows for arm, arm_log in logs.items()}, SIDE_BY_SIDE, PLOTS / "surgery_arms.csv")
    log.finish()


if __name__ == "__main__":
    main()
