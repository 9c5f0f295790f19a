"""Labelling options: fixed-length generation (`stop_at_eos: false`) and the codec of the float arrays."""

import hashlib
import json

import numpy as np
import polars as pl
import pytest
import torch
import zarr
from zarr.codecs import ZstdCodec

from latentlab.hidden.dataset import StoreDataset
from latentlab.hidden.extract import ExtractConfig, Extractor
from latentlab.hidden.labelling import BATCHING, FORMAT, LabelConfig, label, prepare
from latentlab.hidden.npz import export_npz
from latentlab.hidden.store import open_store
from latentlab.lm.sampling import SamplingConfig, sample

PROMPTS = ["1+2=", "13-4=", "7+19=", "0-0=", "19+19=", "5-17="] * 4
HOT = 3.0  # a hot temperature: on the tiny model many rows emit end-of-sequence within 8 tokens


def generate(lm, stop_at_eos: bool, seed: int = 3):
    model, tokenizer = lm
    extractor = Extractor(
        model, tokenizer, ExtractConfig(layers=[0, -1], tokens=8, temperature=HOT, stop_at_eos=stop_at_eos)
    )
    return extractor(PROMPTS, torch.Generator().manual_seed(seed), store_tokens=True)


def test_fixed_length_gives_every_row_n_tokens_and_agrees_with_stopping_up_to_eos(tiny_lm):
    stopped, fixed = generate(tiny_lm, True), generate(tiny_lm, False)
    eos = tiny_lm[1].eos_token_id
    assert (stopped.counts < 8).any(), "the seed should stop some rows early"
    assert (fixed.counts == 8).all() and fixed.token_ids.lengths.tolist() == [8] * len(PROMPTS)
    assert (fixed.tokens[:, :, 1].abs().sum(-1) > 0).all()  # every position of every row is stored (layer -1)
    # the same random stream: each row's tokens and states agree up to where stopping ended it
    for row, (short, full) in enumerate(zip(stopped.token_ids.arrays(), fixed.token_ids.arrays())):
        n = len(short)
        assert full[:n].tolist() == short.tolist()
        torch.testing.assert_close(fixed.tokens[row, :n], stopped.tokens[row, :n], rtol=0, atol=0)
        assert bool(fixed.ended[row]) == (full[-1] == eos)
    # rows that never stopped are the same row in both settings, pooled vector included
    never = (stopped.counts == 8) & ~stopped.ended
    assert never.any()
    torch.testing.assert_close(fixed.pooled[never], stopped.pooled[never], rtol=0, atol=0)
    # the mean is over all 8 positions, end-of-sequence or not
    torch.testing.assert_close(fixed.pooled, fixed.tokens.float().mean(1), rtol=0, atol=2e-3)


def test_sampler_without_stop_runs_every_step_even_when_all_rows_emitted_eos(tiny_lm):
    model, tokenizer = tiny_lm
    ids = tokenizer(["1+2="], return_tensors="pt", add_special_tokens=False)["input_ids"]
    embeds, mask = model.get_input_embeddings()(ids), torch.ones_like(ids)
    # a model whose only likely token is end-of-sequence: stopping ends at once, fixed length does not
    bias = torch.full((model.config.vocab_size,), -1e4)
    bias[tokenizer.eos_token_id] = 0
    handle = model.lm_head.register_forward_hook(lambda module, args, out: out + bias)
    try:
        for stop, length in ((True, 1), (False, 5)):
            cfg = SamplingConfig(max_new_tokens=5, stop_at_eos=stop)
            done = sample(model, embeds, mask, cfg, tokenizer.eos_token_id, tokenizer.pad_token_id)
            assert done.ids.shape == (1, length) and done.mask.all()
            assert (done.ids == tokenizer.eos_token_id).all()
    finally:
        handle.remove()


def label_rows(lm, tmp_path, name: str, **options) -> tuple:
    model, tokenizer = lm
    cfg = LabelConfig(
        layers=[0, -1], tokens=8, temperature=HOT, store_tokens=True, batch_size=8, shard_rows=16, **options
    )
    rows = pl.DataFrame({"id": list(range(len(PROMPTS))), "prompt": PROMPTS})
    extractor = Extractor(model, tokenizer, cfg)
    job = prepare(extractor, "set", rows, cfg, 0, {"source": "test"})
    store, table = tmp_path / f"{name}.zarr", tmp_path / f"{name}.parquet"
    label(extractor, job, store, table, tmp_path / f"{name}.work")
    return job, store, table


@pytest.mark.parametrize("compression", ["none", "lz4"])
def test_every_codec_round_trips_the_arrays_exactly_and_every_reader_opens_it(tiny_lm, tmp_path, compression):
    _, reference, _ = label_rows(tiny_lm, tmp_path, "zstd")
    _, store, table = label_rows(tiny_lm, tmp_path, compression, compression=compression)
    a, b = open_store(reference), open_store(store)
    for name in ("pooled", "tokens", "ids", "n_positions"):
        np.testing.assert_array_equal(b[name][:], a[name][:])
    codecs = [type(c).__name__ for c in b["tokens"].metadata.codecs[0].codecs]
    assert codecs == {"none": ["BytesCodec"], "lz4": ["BytesCodec", "BloscCodec"]}[compression]
    batch = next(iter(StoreDataset(store, layers=[-1], shuffle=False, batch_size=len(PROMPTS))))
    np.testing.assert_array_equal(batch["x"].reshape(len(PROMPTS), -1).numpy(), b["pooled"][:, 1])
    export_npz(store, tmp_path / "out.npz", table)
    np.testing.assert_array_equal(
        np.load(tmp_path / "out.npz")["hidden_state"], b["tokens"][:, :, 1].astype(np.float32)
    )


def test_a_store_written_before_the_codec_option_still_opens(tmp_path):
    """Zarr as the store module wrote it before `compression` existed: every array zstd level 1 (and the
    attributes of then: no hook names, no options added since)."""
    attributes = {
        "format": FORMAT,
        "complete": True,
        "fingerprint": "0" * 64,
        "model": {"path": "models/base", "source": "scratch", "sha256": "1" * 64},
        "layers": [-1],
        "layer_indices": [2],
        "mode": "prompt",
        "tokens": 1,
        "pooling": "mean",
        "positions": "the prompt's tokens",
        "dtype": "float32",
        "hidden_size": 8,
        "rows": 4,
        "seed": 0,
        "temperature": 1.0,
        "top_p": 1.0,
    }
    group = zarr.open_group(tmp_path / "old.zarr", mode="w", zarr_format=3, attributes=attributes)
    pooled = np.random.default_rng(0).normal(size=(4, 1, 8)).astype(np.float32)
    for name, array in {"pooled": pooled, "ids": np.arange(4), "n_positions": np.full(4, 3, np.int32)}.items():
        group.create_array(name, data=array, chunks=array.shape, compressors=ZstdCodec(level=1))
    np.testing.assert_array_equal(open_store(tmp_path / "old.zarr")["pooled"][:], pooled)
    batch = next(iter(StoreDataset(tmp_path / "old.zarr", shuffle=False, batch_size=4)))
    np.testing.assert_array_equal(batch["x"].reshape(4, -1).numpy(), pooled[:, 0])


def test_options_at_their_defaults_stay_out_of_the_fingerprint_and_attributes(tiny_lm, tmp_path):
    job, store, _ = label_rows(tiny_lm, tmp_path, "default")
    attrs = open_store(store).attrs
    assert "stop_at_eos" not in attrs and "compression" not in attrs
    # the fingerprint as it was computed before the options existed, plus how rows are batched (BATCHING)
    cfg = job.cfg.model_dump(exclude={"stop_at_eos", "compression", "pooling"})
    digest = hashlib.sha256(json.dumps([FORMAT, cfg, 0, job.model, "set", BATCHING], sort_keys=True).encode())
    digest.update(job.prompts.flat.tobytes() + job.prompts.offsets.tobytes())
    digest.update(job.rows["id"].to_numpy().tobytes())
    assert job.fingerprint == digest.hexdigest()
    fixed, store, table = label_rows(tiny_lm, tmp_path, "fixed", stop_at_eos=False)
    assert fixed.fingerprint != job.fingerprint
    attrs = open_store(store).attrs
    assert attrs["stop_at_eos"] is False and "end-of-sequence stops no row" in attrs["positions"]
    assert (open_store(store)["n_positions"][:] == 8).all()
    assert pl.read_parquet(table)["n_tokens"].to_list() == [8] * len(PROMPTS)


def test_cli_options_reach_the_label_config():
    from latentlab import cli

    base = "label --model m --prompts p --out o.zarr --shard-rows 1024".split()
    cfg = cli.label_config(cli.build_parser().parse_args(base))
    assert cfg.stop_at_eos is True and cfg.compression == "zstd"
    cfg = cli.label_config(cli.build_parser().parse_args(base + "--no-stop-at-eos --compression lz4".split()))
    assert cfg.stop_at_eos is False and cfg.compression == "lz4"
