"""nla_sft: the natural language autoencoder's supervised phase -> models/nla_sft/{actor,critic}.

Data: data/nla/nla.parquet (prompt, response, activation_vector; the layer its vectors were read at is in its
metadata, and the critic is truncated there): the explanation the actor learns
to write for a vector is the text the vector was computed from (the problem and the base model's
continuation), the only explanation there is at this scale. `nla_sft.train_mode` picks what trains:
the actor (next-token loss on the explanation given the injected vector), the critic (reconstruct
the vector from the explanation) or both on the same batches. Both are saved either way, so nla_rl
always starts from a pair. Under torchrun (`launcher`) each rank trains on its contiguous shard of every
batch under DDP, as `sft` (README: Training on several processes, GPUs or nodes). The critic's targets are
t = (v - mu) / sigma, mu and sigma measured on these vectors and saved with it (policies/nla_critic.py).
With `model.adapter: lora` the actor's model trains LoRA adapters only (its injector as ever):
models/nla_sft/actor holds the merged model, models/nla_sft/actor/adapter the adapter alone.
Log: plots/nla_sft.csv (losses, gradient norms, the critic's FVE on each training batch).
"""

from latentlab.common.atomic import atomic_output
from latentlab.common.inputs import require_model_dir
from latentlab.common.precision import weight_dtype
from latentlab.hidden.nla_table import nla_table_info, read_nla_table
from latentlab.lm.modeling import load_lm
from latentlab.policies.nla_actor import build_actor
from latentlab.policies.nla_critic import NLACriticConfig, build_critic
from latentlab.rl.nla import train_sft
from stages.common import check_layers, setup, stage, step_log
from stages.execution import fine_tuned, supervised, whole
from stages.nla_outputs import save_nla_pair
from stages.paths import MODELS, NLA_TABLE, PLOTS


@stage(torchrun=True)
def main(params):
    run, cfg = setup(params), params.nla_sft
    base = require_model_dir(MODELS / "base")
    check_layers(params, base, ("nla_sft.actor.layers",))
    table, vectors = read_nla_table(NLA_TABLE)
    texts = table.column("response").to_pylist()
    model, tokenizer = load_lm(base, run.device, dtype=weight_dtype(params.model.dtype))
    # the critic is the base model truncated where the vectors were read: the table says where
    critic_cfg = NLACriticConfig(**cfg.critic.model_dump(), layer=nla_table_info(NLA_TABLE).layer)
    critic = build_critic(model, tokenizer, critic_cfg, vectors)  # a truncated copy: the actor trains `model`
    model = fine_tuned(params, model)  # after the critic's copy: the critic is the base model, never adapted
    actor = build_actor(model, tokenizer, cfg.actor, vectors, texts)
    if run.leader:
        print(
            f"nla_sft: {len(texts)} rows, vectors of {vectors.shape[1]}, injection norms {actor.injector.scales.tolist()}"
        )

    log = step_log(params, "nla_sft", params.model_dump(include={"nla_sft", "seed"}))
    learners = train_sft(
        actor if cfg.train_mode in ("actor", "both") else None,
        critic if cfg.train_mode in ("critic", "both") else None,
        vectors,
        texts,
        cfg,
        run.data_rng,
        log,
        execution=supervised(run, params),
    )
    with whole(*learners):  # fsdp: the whole weights gathered to rank 0 (every rank takes part)
        if not run.leader:  # under torchrun rank 0 alone writes the outputs
            return
        with atomic_output(MODELS / "nla_sft") as out:
            save_nla_pair(params, actor, critic, out, base, train_mode=cfg.train_mode)
    log.save(PLOTS / "nla_sft.csv")
    log.finish()


if __name__ == "__main__":
    main()
