"""sft: supervised fine-tuning of models/base on the biased (odd-only) set -> models/sft.

The loss covers the answer and its end-of-sequence token only, never the prompt.
"""

from latentlab.common.atomic import atomic_output
from latentlab.common.inputs import read_table, require_model_dir
from latentlab.lm.modeling import load_lm, read_manifest, save_lm
from latentlab.lm.training import prompt_answer_examples, shuffled_batches, train_lm
from latentlab.tasks.arithmetic import PROBLEM_SCHEMA
from stages.common import MODELS, PLOTS, SYNTH, lm_shards, setup, stage, step_log


@stage(torchrun=True)
def main(params):
    run = setup(params)
    base = require_model_dir(MODELS / "base")
    model, tokenizer = load_lm(base, run.device)
    biased = read_table(SYNTH / "biased.parquet", PROBLEM_SCHEMA)
    examples = prompt_answer_examples(tokenizer, biased["prompt"].to_list(), biased["answer"].to_list())
    log = step_log(params, "sft", params.model_dump(include={"sft", "seed"}))
    batches = shuffled_batches(examples, params.sft.batch_size, tokenizer.pad_token_id, run.data_rng, lm_shards(run))
    train_lm(model, batches, params.sft, run.device, "sft", log, lm_shards(run))
    if not run.leader:  # under torchrun rank 0 alone writes the outputs
        return
    with atomic_output(MODELS / "sft") as out:
        save_lm(
            model,
            tokenizer,
            out,
            parent=read_manifest(base).get("content_sha256"),
            trained_parameters=model.num_parameters(),
        )
    log.save(PLOTS / "sft.csv")  # and plots/sft_speed.csv
    log.finish()


if __name__ == "__main__":
    main()
