"""A store's attributes as one typed model (latentlab/hidden/attrs.py): written byte for byte as before, read
back by everyone, old stores still open, bad ones named; live extraction takes its settings from them."""

import json

import polars as pl
import pytest
import torch
import zarr

from latentlab.hidden import labelling
from latentlab.hidden.attrs import FORMAT, ModelInfo, StoreAttrs
from latentlab.hidden.extract import POSITIONS, ExtractConfig, Extractor
from latentlab.hidden.info import describe_store, hook_name
from latentlab.hidden.labelling import LabelConfig, label, prepare
from latentlab.hidden.store import open_store, store_attrs
from latentlab.lm.modeling import save_lm
from latentlab.lm.prompt_format import RAW, PromptFormat
from latentlab.tasks.grid_online import OnlineConfig, make_encoder

PROMPTS = ["1+2=", "13-4=", "7+19=", "0-0=", "19+19=", "5-17="]
MODEL = {"path": "models/base", "source": "scratch", "sha256": "ab" * 32}


def _attributes_as_before(job, extractor) -> dict:
    """`Job.attributes` as it was written before StoreAttrs, key for key (the bytes dvc.lock pins)."""
    mode = "text" if job.completions is not None else job.cfg.mode
    blocks = 2  # the tiny model's
    attributes = {
        "format": FORMAT,
        "complete": False,
        "fingerprint": job.fingerprint,
        "model": job.model,
        "layers": list(job.cfg.layers),
        "layer_indices": extractor.layer_indices,
        "hook_names": [hook_name(i, blocks) for i in extractor.layer_indices],
        "num_blocks": blocks,
        "mode": mode,
        "tokens": job.cfg.tokens,
        "pooling": "mean",
        "positions": POSITIONS[mode] if mode == "text" else job.cfg.positions,
        "dtype": job.cfg.dtype,
        "hidden_size": extractor.hidden_size,
        "rows": job.rows.height,
        "seed": job.seed,
        "temperature": job.cfg.temperature,
        "top_p": job.cfg.top_p,
    }
    if not job.cfg.stop_at_eos:
        attributes["stop_at_eos"] = False
    return attributes


@pytest.mark.parametrize(
    "options",
    [{"tokens": 4}, {"tokens": 1}, {"tokens": 6, "stop_at_eos": False, "temperature": 0.5, "top_p": 0.9}],
    ids=["generate", "prompt", "fixed-length"],
)
def test_a_labelled_store_holds_exactly_the_attributes_written_before(tiny_lm, tmp_path, options):
    cfg = LabelConfig(layers=[1, -1], store_tokens=True, batch_size=2, shard_rows=4, **options)
    extractor = Extractor(*tiny_lm, cfg)
    rows = pl.DataFrame({"id": list(range(len(PROMPTS))), "prompt": PROMPTS})
    job = prepare(extractor, "rows", rows, cfg, 0, dict(MODEL))
    label(extractor, job, tmp_path / "s.zarr", tmp_path / "s.parquet", tmp_path / "work")
    expected = _attributes_as_before(job, extractor) | {"complete": True}
    written = json.loads((tmp_path / "s.zarr" / "zarr.json").read_text())["attributes"]
    assert json.dumps(written) == json.dumps(expected)  # same keys, same order, same values
    assert store_attrs(tmp_path / "s.zarr").to_attributes() == written


def test_the_pooling_is_recorded_and_a_default_pooling_leaves_the_fingerprint_as_before(tiny_lm):
    rows = pl.DataFrame({"id": [0, 1], "prompt": PROMPTS[:2]})
    jobs = {}
    for how in ("mean", "last"):
        cfg = LabelConfig(layers=[-1], tokens=4, pooling=how)
        extractor = Extractor(*tiny_lm, cfg)
        jobs[how] = (prepare(extractor, "rows", rows, cfg, 0, dict(MODEL)), extractor)
    assert "pooling" not in labelling._identity(jobs["mean"][0].cfg)  # the fingerprint of stores before the option
    assert jobs["mean"][0].fingerprint != jobs["last"][0].fingerprint
    assert jobs["last"][0].attributes(jobs["last"][1]).to_attributes()["pooling"] == "last"


@pytest.mark.parametrize(
    "cfg, prompt",
    [
        (ExtractConfig(), RAW),
        (
            ExtractConfig(
                layers=[0, -1], tokens=5, temperature=0.7, top_p=0.9, stop_at_eos=False, dtype="bfloat16", pooling="max"
            ),
            PromptFormat(format="chat", system="Be brief."),
        ),
        (ExtractConfig(tokens=3, pooling="last", temperature=0.0), PromptFormat(format="chat")),
    ],
)
def test_an_extraction_round_trips_through_the_attributes(cfg, prompt):
    attrs = StoreAttrs.of_extraction(cfg, prompt, model=ModelInfo(**MODEL), hidden_size=32, rows=3, seed=0)
    written = json.loads(json.dumps(attrs.to_attributes()))  # as zarr.json holds them
    again = StoreAttrs.read(written, "s.zarr")
    assert again == attrs
    assert again.extract_config() == cfg and again.prompt_format == prompt
    assert ("stop_at_eos" in written) == (not cfg.stop_at_eos) and ("prompt" in written) == (prompt != RAW)
    assert again.extract_config(layers=[-1], tokens=2) == cfg.model_copy(update={"layers": [-1], "tokens": 2})


def test_old_stores_read_with_the_defaults_of_their_time():
    """Before the options existed: no stop_at_eos (stopped at EOS), prompt (raw), pooling (mean), hook names."""
    old = {
        "format": FORMAT,
        "complete": True,
        "fingerprint": "f" * 64,
        "model": MODEL,
        "layers": [-1],
        "layer_indices": [2],
        "mode": "generate",
        "tokens": 8,
        "positions": POSITIONS["generate"],
        "dtype": "float32",
        "hidden_size": 32,
        "rows": 6,
        "seed": 0,
        "temperature": 1.0,
        "top_p": 1.0,
    }
    attrs = StoreAttrs.read(old, "old.zarr")
    assert attrs.stop_at_eos and attrs.prompt_format == RAW and attrs.pooling == "mean" and attrs.hook_names is None
    assert attrs.extract_config() == ExtractConfig(layers=[-1], tokens=8)
    assert attrs.to_attributes() == old | {"pooling": "mean"}  # written again: only pooling, which is always written


def test_an_imported_store_reads_but_cannot_be_extracted_like():
    imported = {
        "format": FORMAT,
        "complete": True,
        "model": {"source": "imported from ref.npz"},
        "layers": [-1],
        "mode": "imported",
        "tokens": 8,
        "pooling": "mean",
        "positions": "the first n_positions of the file's T positions (all T without n_positions)",
        "dtype": "float64",
        "hidden_size": 16,
        "rows": 4,
    }
    attrs = StoreAttrs.read(imported, "imported.zarr")
    assert attrs.to_attributes() == imported and list(attrs.to_attributes()) == list(imported)
    with pytest.raises(ValueError, match="imported.zarr: mode imported records no extraction settings"):
        attrs.extract_config()


def _store(path, attributes: dict):
    zarr.open_group(path, mode="w", zarr_format=3, attributes=attributes)
    return path


@pytest.mark.parametrize(
    "change, message",
    [
        ({"rows": None}, "attribute 'rows' is missing"),
        ({"tokens": "8"}, "attribute 'tokens': Input should be a valid integer"),
        ({"model": None}, "attribute 'model' is missing"),
        ({"pooling": "median"}, "attribute 'pooling': Input should be 'last', 'mean', 'max', 'cls' or 'weighted'"),
        ({"stop_at_eos": "no"}, "attribute 'stop_at_eos'"),
        ({"format": "other/1"}, "attribute 'format'"),
    ],
)
def test_a_store_with_unreadable_attributes_is_named_with_the_key_and_the_fix(tmp_path, change, message):
    attributes = StoreAttrs.of_extraction(
        ExtractConfig(), model=ModelInfo(**MODEL), hidden_size=32, rows=3, complete=True
    ).to_attributes()
    attributes = {k: v for k, v in (attributes | change).items() if v is not None}
    store = _store(tmp_path / "bad.zarr", attributes)
    for read in (open_store, describe_store, store_attrs):
        with pytest.raises(ValueError) as error:
            read(store)
        text = str(error.value)
        assert str(store) in text and message in text and "`dvc repro label`" in text and "`latentlab label`" in text


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tiny_lm):
    directory = tmp_path_factory.mktemp("model") / "base"
    save_lm(*tiny_lm, directory, source="scratch", arch="llama")
    return directory


def test_live_extraction_pools_as_the_store_was_labelled(model_dir):
    """The silent-mean bug: a store labelled with `last` pooling is extracted live with `last`, not mean."""
    labelled = StoreAttrs.of_extraction(
        ExtractConfig(layers=[1, -1], tokens=1, pooling="last"), model=ModelInfo(**MODEL), hidden_size=32, rows=3
    )
    encoder = make_encoder(OnlineConfig(layer=-1), model_dir, labelled, "cpu", 0)
    assert encoder.extractor.cfg == ExtractConfig(layers=[-1], tokens=1, pooling="last")
    model_last = encoder(PROMPTS)
    mean = make_encoder(OnlineConfig(layer=-1), model_dir, labelled.model_copy(update={"pooling": "mean"}), "cpu", 0)
    assert not torch.allclose(torch.from_numpy(model_last), torch.from_numpy(mean(PROMPTS)))
    direct = Extractor(encoder.extractor.model, encoder.extractor.tokenizer, ExtractConfig(layers=[-1], pooling="last"))
    assert (model_last == direct(PROMPTS).pooled[:, 0].numpy()).all()


def test_a_server_that_pools_otherwise_is_refused(monkeypatch):
    class Served:  # a `latentlab serve` started without --pooling
        def __init__(self, url, layer):
            self.info = {"layers": [-1], "pooling": "mean"}

    monkeypatch.setattr("latentlab.hidden.client.HiddenClient", Served)
    labelled = StoreAttrs.of_extraction(
        ExtractConfig(tokens=1, pooling="max"), model=ModelInfo(**MODEL), hidden_size=32, rows=3
    )
    with pytest.raises(ValueError, match="pools by mean, the training states by max: start it with --pooling max"):
        make_encoder(OnlineConfig(layer=-1, server="http://x:1"), None, labelled, "cpu", 0)
