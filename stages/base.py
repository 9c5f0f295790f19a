"""base: the base language model -> models/base (a Hugging Face directory).

`model.source: scratch` builds the character tokenizer and a tiny Llama/Qwen2 model and
pretrains it on equations of both parities (without end-of-sequence after answers), and on a share
(`base.grid_share`) of sequences packed from the grid world's observation texts. Any other
source is a hub id or a local directory, copied into models/base so the run is pinned.
"""

from contextlib import nullcontext

import polars as pl

from latentlab.common.atomic import atomic_output
from latentlab.common.inputs import read_table
from latentlab.lm.modeling import build_tiny_lm, load_lm, prepare_pretrained, save_lm
from latentlab.lm.tokenizer import build_char_tokenizer
from latentlab.lm.training import lm_examples, shuffled_batches, train_lm
from latentlab.tasks.arithmetic import PROBLEM_SCHEMA, pretraining_corpus
from stages.common import setup, stage, step_log
from stages.execution import supervised
from stages.paths import GRID_TEXTS, MODELS, PLOTS, SYNTH


@stage(torchrun=True)
def main(params):
    run = setup(params)
    cfg = params.base
    log = step_log(params, "base", params.model_dump(include={"model", "base", "seed"}))
    if params.model.source == "scratch":
        tokenizer = build_char_tokenizer()
        model = build_tiny_lm(params.model, tokenizer).to(run.device)
        problems = read_table(SYNTH / "full.parquet", PROBLEM_SCHEMA)
        grid = read_table(GRID_TEXTS, {"prompt": pl.String})["prompt"].to_list() if cfg.grid_share else None
        corpus = pretraining_corpus(
            problems, cfg.corpus_sequences, cfg.sequence_chars, params.seed, grid, cfg.grid_share
        )
        examples = lm_examples(tokenizer, corpus)
        batches = shuffled_batches(
            examples, cfg.batch_size, tokenizer.pad_token_id, run.data_rng, supervised(run, params).shards
        )
        learner = train_lm(model, batches, cfg, log, "base", execution=supervised(run, params))
        provenance = {"source": "scratch", "arch": params.model.arch}
    else:
        model, tokenizer = load_lm(params.model.source, run.device, revision=params.model.revision)
        prepare_pretrained(model, tokenizer)
        provenance, learner = {"source": params.model.source, "revision": params.model.revision}, None
    saving = learner.whole() if learner else nullcontext()  # fsdp: the whole weights gathered to rank 0
    with saving:  # (every rank takes part)
        if not run.leader:  # under torchrun rank 0 alone writes the outputs
            return
        with atomic_output(MODELS / "base") as out:
            digest = save_lm(model, tokenizer, out, trained_parameters=model.num_parameters(), **provenance)
    log.save(PLOTS / "base.csv")  # and plots/base_speed.csv
    log.finish()
    print(f"models/base: {model.num_parameters():,} parameters, sha256 {digest[:12]}")


if __name__ == "__main__":
    main()
