"""nla_rl: RL of the NLA actor (GRPO or PPO, `nla_rl.algo`), rewarded by the critic -> models/nla_rl/.

Prompts are activation vectors of data/nla/nla.parquet; the reward is f(||critic(text) - t||^2)
(`nla_rl.reward`), t = (v - mu) / sigma on the SFT critic's fixed scale (an empty explanation: the mean
predictor's error ||t||^2, rl/nla.py); after every RL step the critic takes `nla_rl.critic.updates_per_step`
steps on the batch's (explanation, vector) pairs. GRPO is the shared core (rl/grpo.py), PPO the
shared PPO (rl/ppo.py) with a value head on the actor's model. Held-out FVE (1 - sum ||t - t_hat||^2 /
sum ||t - mean(t)||^2), cosine and MSE of greedy explanations every `eval_every` steps. Under torchrun
(`launcher`) the batch's prompts are split across ranks as in `grpo` (README: Training on several processes,
GPUs or nodes): the actor (model and injection map), PPO's value head and the critic train under DDP.
Log: plots/nla_rl.csv (reward, MSE, cosine, FVE, KL, explanation length, loss) and plots/nla_rl_speed.csv
(tokens/s). With `model.adapter: lora` the actor's model trains LoRA adapters only (its injector as ever), GRPO's
reference is that model with them off beside a frozen copy of the injector; models/nla_rl/actor holds the merged
model, models/nla_rl/actor/adapter the adapter alone.
"""

import copy

from latentlab.common.atomic import atomic_output
from latentlab.common.batches import epoch_batches
from latentlab.common.execution import Loop
from latentlab.common.inputs import require_model_dir
from latentlab.common.precision import weight_dtype
from latentlab.hidden.nla_table import read_nla_table
from latentlab.lm.modeling import save_weights
from latentlab.policies.adapter import AdapterDisabled
from latentlab.policies.nla_actor import NLAActor, load_actor
from latentlab.policies.nla_critic import load_critic
from latentlab.policies.value_head import ValueHead
from latentlab.rl.grpo import GRPOTrainer
from latentlab.rl.nla import CriticReward, CriticTrainer, train_rl
from latentlab.rl.ppo import PPOTrainer
from latentlab.tasks.nla_eval import explain, reconstruction_scores
from stages.common import require_divisible, setup, stage, step_log
from stages.execution import fine_tuned, sampling, whole
from stages.nla_outputs import save_nla_pair
from stages.paths import MODELS, NLA_EVAL_TABLE, NLA_TABLE, PLOTS


@stage(torchrun=True)
def main(params):
    run, cfg = setup(params), params.nla_rl
    per_step, key = (
        (cfg.grpo.prompts_per_step, "nla_rl.grpo.prompts_per_step")
        if cfg.algo == "grpo"
        else (cfg.ppo.rollouts_per_step, "nla_rl.ppo.rollouts_per_step")
    )
    require_divisible(run, per_step, key)
    sft = require_model_dir(MODELS / "nla_sft" / "actor")
    actor = load_actor(sft, run.device, dtype=weight_dtype(params.model.dtype))
    actor.model = fine_tuned(params, actor.model)
    lora = params.model.adapter == "lora"
    critic = load_critic(MODELS / "nla_sft" / "critic", run.device)
    _, vectors = read_nla_table(NLA_TABLE)
    _, heldout = read_nla_table(NLA_EVAL_TABLE)
    heldout = heldout[: cfg.eval_batch]

    reward = CriticReward(critic, cfg.reward)
    if cfg.algo == "grpo":
        algo = cfg.grpo
        if lora:  # the SFT actor: the shared model with its adapters off, and the injector as it starts
            frozen = NLAActor(actor.model, actor.tokenizer, copy.deepcopy(actor.injector).requires_grad_(False))
            reference = AdapterDisabled(frozen) if algo.beta > 0 else None
        else:
            reference = copy.deepcopy(actor) if algo.beta > 0 else None  # the SFT actor, frozen
            if reference is not None:
                reference.model.requires_grad_(False)
        trainer = GRPOTrainer(
            actor, reward, algo, run.sample_rngs, reference=reference, execution=sampling(run, params)
        )
        value_head = None
    else:
        algo = cfg.ppo
        value_head = ValueHead(actor.model.config.hidden_size)
        trainer = PPOTrainer(actor, value_head, reward, algo, run.sample_rngs, execution=sampling(run, params))
    rows = epoch_batches(len(vectors), per_step, run.data_rng)
    batches = ([vectors[i] for i in batch] for batch in rows)

    def monitor() -> dict[str, float]:
        texts = explain(actor, heldout, algo.max_new_tokens, len(heldout), "held-out")
        return {f"heldout_{k}": v for k, v in reconstruction_scores(critic, texts, heldout).items()}

    log = step_log(params, "nla_rl", params.model_dump(include={"nla_rl", "seed"}))
    critic_trainer = CriticTrainer(critic, cfg.critic, algo.steps, execution=sampling(run, params))
    loop = Loop(log=log, desc=f"nla_rl {cfg.algo}", evaluate=monitor, eval_every=cfg.eval_every)
    train_rl(trainer, reward, critic_trainer, batches, steps=algo.steps, loop=loop)
    with whole(trainer.learner, critic_trainer.learner):  # fsdp: whole weights gathered to rank 0 (every rank)
        if not run.leader:  # under torchrun rank 0 alone writes the outputs
            return
        with atomic_output(MODELS / "nla_rl") as out:
            save_nla_pair(params, actor, critic, out, sft, algo=cfg.algo, max_new_tokens=algo.max_new_tokens)
            if value_head is not None:
                save_weights(value_head, out / "value_head.safetensors")
    log.save(PLOTS / "nla_rl.csv")
    log.finish()


if __name__ == "__main__":
    main()
