"""sft: supervised fine-tuning of models/base on the biased (odd-only) set -> models/sft.

The loss covers the answer and its end-of-sequence token only, never the prompt. With
`sft.placeholder_share` > 0 that share of examples carries a virtual token after the prompt
(latentlab/policies/placeholder.py); at 0 nothing of it runs. With `model.adapter: lora` only LoRA adapters train
(latentlab/lm/adapters.py): models/sft holds the merged model, models/sft/adapter the adapter alone.
"""

import torch

from latentlab.common.inputs import read_table, require_model_dir
from latentlab.lm.tokenizer import INJECT
from latentlab.lm.training import prompt_answer_examples, shuffled_batches, train_lm
from latentlab.policies.placeholder import PlaceholderLM, add_placeholders
from latentlab.tasks.arithmetic import PROBLEM_SCHEMA
from stages.common import check_layers, setup, stage, step_log
from stages.execution import load_trained_lm, save_fine_tuned_lm, supervised
from stages.paths import MODELS, PLOTS, SYNTH


@stage(torchrun=True)
def main(params):
    run = setup(params)
    base = require_model_dir(MODELS / "base")
    check_layers(params, base, ("sft.placeholder_layer",))
    model, tokenizer = load_trained_lm(params, base, run)
    biased = read_table(SYNTH / "biased.parquet", PROBLEM_SCHEMA)
    examples = prompt_answer_examples(tokenizer, biased["prompt"].to_list(), biased["answer"].to_list(), params.prompt)
    cfg, trained = params.sft, model
    if cfg.placeholder_share > 0:  # its own seeded draw: the data order stays that of plain SFT
        inject_id = tokenizer.convert_tokens_to_ids(INJECT)
        chooser = torch.Generator().manual_seed(params.seed + 2)
        examples = add_placeholders(examples, cfg.placeholder_share, inject_id, chooser)
        trained = PlaceholderLM(model, inject_id, cfg.placeholder, cfg.placeholder_layer)
    log = step_log(params, "sft", params.model_dump(include={"sft", "seed"}))
    batches = shuffled_batches(
        examples, cfg.batch_size, tokenizer.pad_token_id, run.data_rng, supervised(run, params).shards
    )
    learner = train_lm(trained, batches, cfg, log, "sft", execution=supervised(run, params))
    with learner.whole():  # fsdp: the whole weights gathered to rank 0 (every rank takes part)
        if not run.leader:  # under torchrun rank 0 alone writes the outputs
            return
        save_fine_tuned_lm(params, model, tokenizer, MODELS / "sft", base)
    log.save(PLOTS / "sft.csv")  # and plots/sft_speed.csv
    log.finish()


if __name__ == "__main__":
    main()
