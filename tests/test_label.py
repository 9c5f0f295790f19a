"""The label stage: pooling semantics, the Zarr store, resume after SIGKILL, torchrun, clean errors."""

import signal
import subprocess
import sys
import time

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import zarr

from latentlab.hidden.extract import ExtractConfig, Extractor, TokenRows
from latentlab.hidden.labelling import LabelConfig, _start_or_resume, label, prepare
from latentlab.hidden.store import open_store
from latentlab.lm.modeling import describe_model, load_lm
from latentlab.lm.sampling import positions_from_mask
from latentlab.tasks.arithmetic import PROBLEM_SCHEMA
from tests.label_fixtures import ENV, run_stage, save_model, scratch_repo, start_stage, tree_bytes

PROMPTS = ["1+2=", "13-4=", "7+19=", "0-0=", "19+19=", "5-17="]
STAGE_LABEL = {
    "datasets": ["full", "test"],
    "layers": [1, -1],
    "tokens": 8,
    "store_tokens": True,
    "batch_size": 8,
    "shard_rows": 16,
    "temperature": 1.5,
}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tiny_lm):
    return save_model(tiny_lm, tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def lm(model_dir):
    return load_lm(model_dir)


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory, model_dir):
    """The stage run once, uninterrupted, in one process: what every other way of running must equal."""
    repo = scratch_repo(tmp_path_factory.mktemp("uninterrupted"), model_dir, STAGE_LABEL)
    run_stage(repo)
    return repo


def hf_hidden_states(model, tokenizer, texts):
    enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    out = model(**enc, position_ids=positions_from_mask(enc["attention_mask"]), output_hidden_states=True)
    return out.hidden_states, enc["attention_mask"]


def test_prompt_mode_is_the_mean_of_output_hidden_states_over_the_prompt(lm):
    model, tokenizer = lm
    layers = [0, 1, -1, -3]  # -3 is 0 again on a 2-block model
    result = Extractor(model, tokenizer, ExtractConfig(layers=layers, tokens=1))(PROMPTS, store_tokens=True)
    hidden, mask = hf_hidden_states(model, tokenizer, PROMPTS)
    weights = mask[..., None].float()
    for j, layer in enumerate(layers):
        expected = (hidden[layer] * weights).sum(1) / weights.sum(1)
        torch.testing.assert_close(result.pooled[:, j], expected, rtol=0, atol=1e-6)
    assert result.counts.tolist() == [len(p) for p in PROMPTS]
    # per-token states are left-aligned: position 0 is the first real prompt token, zeros after the prompt
    row, n = 0, len(PROMPTS[0])
    start = mask.shape[1] - n
    torch.testing.assert_close(result.tokens[row, :n, 2].float(), hidden[-1][row, start:].half().float())
    assert (result.tokens[row, n:] == 0).all()


def test_generate_mode_is_the_mean_of_hf_generate_hidden_states_up_to_eos(lm):
    model, tokenizer = lm
    extractor = Extractor(model, tokenizer, ExtractConfig(layers=[1, -1], tokens=6, temperature=0.0))
    result = extractor(PROMPTS)
    enc = tokenizer(PROMPTS, return_tensors="pt", padding=True, add_special_tokens=False)
    out = model.generate(
        **enc,
        max_new_tokens=6,
        do_sample=False,
        output_hidden_states=True,
        return_dict_in_generate=True,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    generated = out.sequences[:, enc["input_ids"].shape[1] :]
    assert tokenizer.batch_decode(generated, skip_special_tokens=True) == extractor.decode(result.token_ids)
    is_eos = (generated == tokenizer.eos_token_id).long()
    alive = (is_eos.cumsum(1) - is_eos) == 0  # up to and including end-of-sequence
    for j, layer in enumerate([1, -1]):
        steps = torch.stack([h[layer][:, -1] for h in out.hidden_states], 1)  # the position producing token t
        expected = (steps * alive[..., None]).sum(1) / alive.sum(1, keepdim=True)
        torch.testing.assert_close(result.pooled[:, j], expected, rtol=0, atol=1e-6)


def test_positions_after_eos_never_enter_the_mean_and_reextraction_reproduces_it(lm):
    model, tokenizer = lm
    cfg = ExtractConfig(layers=[0, -1], tokens=8, temperature=3.0)  # hot: some rows stop early
    prompts = PROMPTS * 8
    generated = Extractor(model, tokenizer, cfg)(prompts, torch.Generator().manual_seed(3), store_tokens=True)
    ended = generated.ended
    assert ended.any() and not ended.all(), "the seed should give rows that stop early and rows that do not"
    assert (generated.counts[~ended] == 8).all() and (generated.counts < 8).any()
    for row in torch.nonzero(ended).flatten().tolist():
        assert (generated.tokens[row, generated.counts[row] :] == 0).all()

    # the same tokens, teacher-forced: same positions, same vectors (this is re-extraction)
    extractor = Extractor(model, tokenizer, ExtractConfig(layers=[0, -1]))
    again = extractor(prompts, store_tokens=True, width=8, completions=generated.token_ids)
    assert again.counts.tolist() == generated.counts.tolist()
    torch.testing.assert_close(again.pooled, generated.pooled, rtol=0, atol=1e-5)
    torch.testing.assert_close(again.tokens.float(), generated.tokens.float(), rtol=0, atol=2e-3)
    # from the text alone, where decoding then encoding gives the same tokens back
    texts = extractor.decode(generated.token_ids)
    special = set(tokenizer.all_special_ids) - {tokenizer.eos_token_id}
    plain = [i for i, ids in enumerate(generated.token_ids.arrays()) if not special & set(ids.tolist())]
    assert len(plain) > len(prompts) // 2
    from_text = extractor(
        [prompts[i] for i in plain],
        completions=extractor.completion_ids([texts[i] for i in plain], [bool(ended[i]) for i in plain]),
    )
    torch.testing.assert_close(from_text.pooled, generated.pooled[plain], rtol=0, atol=1e-5)


class RecordingExtractor(Extractor):
    """The real extractor, noting the prompt lengths of each batch it is handed."""

    def __init__(self, *args):
        super().__init__(*args)
        self.batches = []

    def __call__(self, prompts, *args, **kwargs):
        self.batches.append(prompts.lengths.tolist())
        return super().__call__(prompts, *args, **kwargs)


# lengths 4, 6, 5, 4, 5, 5 | 4, 6: two shards of 6 rows, batches of 3
MIXED = ["1+2=", "19+19=", "13-4=", "0-0=", "7+19=", "5-17=", "3+3=", "11+11="]


@pytest.mark.parametrize("tokens", [1, 6])
def test_rows_run_grouped_by_length_and_every_output_comes_back_in_row_order(lm, model_dir, tmp_path, tokens):
    """Within a shard the rows run shortest first (a batch of one length has no padding), and the arrays and the
    table are back in row order: each row's vector is its prompt's (prompt mode), or its own sampled tokens'
    (generate mode: teacher-forcing the table's token ids gives the store's vector and count)."""
    model, tokenizer = lm
    cfg = LabelConfig(layers=[1, -1], tokens=tokens, store_tokens=True, batch_size=3, shard_rows=6, temperature=1.5)
    extractor = RecordingExtractor(model, tokenizer, cfg)
    rows = pl.DataFrame({"id": list(range(10, 18)), "prompt": MIXED})
    label(
        extractor,
        prepare(extractor, "m", rows, cfg, 0, describe_model(model_dir)),
        tmp_path / "m.zarr",
        tmp_path / "m.parquet",
        tmp_path / "work",
    )
    assert extractor.batches == [[4, 4, 5], [5, 5, 6], [4, 6]]
    store, table = open_store(tmp_path / "m.zarr"), pl.read_parquet(tmp_path / "m.parquet")
    assert store["ids"][:].tolist() == list(range(10, 18)) and table["prompt"].to_list() == MIXED
    one_by_one = Extractor(model, tokenizer, ExtractConfig(layers=[1, -1]))
    for row, prompt in enumerate(MIXED):
        if tokens == 1:
            expected = one_by_one([prompt], store_tokens=True, width=6)
        else:
            ids = TokenRows.from_lists([table["token_ids"][row].to_list()])
            expected = one_by_one([prompt], store_tokens=True, width=6, completions=ids)
        np.testing.assert_allclose(store["pooled"][row], expected.pooled[0].numpy(), rtol=0, atol=1e-5)
        np.testing.assert_allclose(store["tokens"][row], expected.tokens[0].numpy(), rtol=0, atol=2e-3)
        assert store["n_positions"][row] == expected.counts[0] == (len(prompt) if tokens == 1 else len(ids.flat))


def test_bad_inputs_are_refused_before_any_work(lm, model_dir, tmp_path):
    model, tokenizer = lm
    with pytest.raises(ValueError, match="layer 3 is out of range"):
        Extractor(model, tokenizer, ExtractConfig(layers=[1, 3]))
    with pytest.raises(ValueError, match="layer -4 is out of range"):
        Extractor(model, tokenizer, ExtractConfig(layers=[-4]))
    cfg = LabelConfig(tokens=8, batch_size=2, shard_rows=4)
    extractor = Extractor(model, tokenizer, cfg)
    rows = pl.DataFrame({"id": [0, 1], "prompt": ["1+1=", "9" * 60 + "="]})  # 61 + 8 > 64 positions
    with pytest.raises(
        ValueError, match=r"long: row id=1: 61 prompt tokens \+ 8 more exceed the model's context of 64"
    ):
        prepare(extractor, "long", rows, cfg, 0, describe_model(model_dir))
    with pytest.raises(ValueError, match="empty: no rows to label"):
        prepare(extractor, "empty", rows.clear(), cfg, 0, describe_model(model_dir))
    assert not any(tmp_path.iterdir())


def test_stage_refuses_a_long_prompt_with_one_line_and_writes_nothing(model_dir, tmp_path, monkeypatch, capsys):
    # 6-character prompts + 60 > 64 positions (every set's rows are read first: no grid texts in this scratch repo)
    repo = scratch_repo(tmp_path, model_dir, {"tokens": 60, "datasets": ["full", "test"]})
    monkeypatch.chdir(repo)
    from stages.label import main

    with pytest.raises(SystemExit) as exit_info:
        main()
    assert exit_info.value.code == 1
    assert "exceed the model's context of 64 positions" in capsys.readouterr().err
    assert not (repo / "data" / "hidden").exists() and not (repo / "data" / ".partial").exists()


def test_store_layout_attributes_and_tables(reference_run):
    data = reference_run / "data"
    store = open_store(data / "hidden" / "full.zarr")
    full = pl.read_parquet(reference_run / "data" / "synth" / "full.parquet")
    n = full.height
    assert store["pooled"].shape == (n, 2, 32) and store["pooled"].dtype == np.float32
    assert store["tokens"].shape == (n, 8, 2, 32) and store["tokens"].dtype == np.float16
    assert store["pooled"].shards == (16, 2, 32) and store["pooled"].chunks == (8, 2, 32)
    assert (store["ids"][:] == full["id"].to_numpy()).all()
    attrs = dict(store.attrs)
    assert attrs["complete"] is True and attrs["mode"] == "generate" and attrs["tokens"] == 8
    assert attrs["layers"] == [1, -1] and attrs["layer_indices"] == [1, 2] and attrs["pooling"] == "mean"
    assert attrs["model"]["sha256"] == describe_model(reference_run / "models" / "base")["sha256"]
    # a few files per array, not one per chunk: ceil(760 / 16) = 48 shards per array here
    assert len(list((data / "hidden" / "full.zarr" / "pooled").rglob("c/*/*/*"))) == -(-n // 16)

    # the mean over the stored tokens is the pooled vector: nothing past end-of-sequence was counted
    counts = store["n_positions"][:]
    tokens = store["tokens"][:].astype(np.float32)
    np.testing.assert_allclose(tokens.sum(1) / counts[:, None, None], store["pooled"][:], atol=2e-3)
    assert (counts < 8).any()

    labels = pl.read_parquet(data / "labels" / "full.parquet")
    assert labels.select(list(PROBLEM_SCHEMA)).equals(full) and labels["n_tokens"].to_list() == counts.tolist()
    assert not any((data / ".partial" / "label").iterdir())


def test_sigkill_then_rerun_resumes_and_gives_the_identical_store(reference_run, model_dir, tmp_path):
    repo = scratch_repo(tmp_path, model_dir, STAGE_LABEL)
    work = repo / "data" / ".partial" / "label" / "full"
    process = start_stage(repo)
    deadline = time.monotonic() + 120
    while not (work / "done").is_dir() or len(list((work / "done").iterdir())) < 2:
        assert process.poll() is None, "the run ended before it could be killed:\n" + process.stdout.read()[-2000:]
        assert time.monotonic() < deadline
        time.sleep(0.005)
    process.send_signal(signal.SIGKILL)
    process.wait()
    shards_done = len(list((work / "done").iterdir()))
    assert shards_done < 48, "killed too late to test a resume"
    # nothing looks complete: no final store, and the one in progress says so
    assert not (repo / "data" / "hidden" / "full.zarr").exists()
    assert zarr.open_group(work / "store.zarr", mode="r").attrs["complete"] is False
    with pytest.raises(ValueError, match="incomplete"):
        open_store(work / "store.zarr")

    output = run_stage(repo)
    assert f"resuming, {shards_done} of 48 shard(s) already done" in output
    for name in ("full", "test"):
        assert tree_bytes(repo / "data" / "hidden" / f"{name}.zarr") == tree_bytes(
            reference_run / "data" / "hidden" / f"{name}.zarr"
        )
        assert pl.read_parquet(repo / "data" / "labels" / f"{name}.parquet").equals(
            pl.read_parquet(reference_run / "data" / "labels" / f"{name}.parquet")
        )


def test_torchrun_two_ranks_write_the_same_store_as_one_process(reference_run, model_dir, tmp_path):
    repo = scratch_repo(tmp_path, model_dir, STAGE_LABEL)
    run_stage(repo, nproc=2)
    for name in ("full", "test"):
        assert tree_bytes(repo / "data" / "hidden" / f"{name}.zarr") == tree_bytes(
            reference_run / "data" / "hidden" / f"{name}.zarr"
        )
    assert tree_bytes(repo / "data" / "labels") == tree_bytes(reference_run / "data" / "labels")


def test_work_of_a_different_job_is_discarded_not_resumed(lm, model_dir, tmp_path):
    model, tokenizer = lm
    rows = pl.DataFrame({"id": list(range(10)), "prompt": PROMPTS + PROMPTS[:4]})

    def job_for(layers):
        cfg = LabelConfig(layers=layers, batch_size=2, shard_rows=4)
        extractor = Extractor(model, tokenizer, cfg)
        return extractor, prepare(extractor, "rows", rows, cfg, 0, describe_model(model_dir))

    # what a SIGKILL leaves of a run of another job: its store, and shard 0 marked done
    extractor, stale = job_for([0])
    _start_or_resume(extractor, stale, tmp_path / "work")
    (tmp_path / "work" / "done" / "0").touch()

    extractor, job = job_for([-1])
    label(extractor, job, tmp_path / "rows.zarr", None, tmp_path / "work")
    store = open_store(tmp_path / "rows.zarr")
    assert store.attrs["layers"] == [-1] and not (tmp_path / "work").exists()
    expected = Extractor(model, tokenizer, ExtractConfig(layers=[-1]))(rows["prompt"].to_list()[:4]).pooled
    np.testing.assert_allclose(store["pooled"][:4, 0], expected[:, 0].numpy(), atol=1e-6)


def test_nla_table_stage_writes_the_reference_format_and_says_which_layer(reference_run):
    """nla_table: the problems, the text each vector was pooled over and the vector of layer nla_table.layer,
    with the facts of the vectors in the table's own metadata (what nla_sft and evaluate_nla read)."""
    from latentlab.hidden.nla_table import nla_table_info, read_nla_table

    subprocess.run([sys.executable, "-m", "stages.nla_table"], cwd=reference_run, env=ENV, check=True, timeout=300)
    data = reference_run / "data"
    store, labels = open_store(data / "hidden" / "full.zarr"), pl.read_parquet(data / "labels" / "full.parquet")
    table, vectors = read_nla_table(data / "nla" / "nla.parquet")
    assert table.column_names == ["id", "prompt", "response", "activation_vector"]
    # the response is the text the vector was pooled over: the problem and what the model generated after it
    responses = [p + t for p, t in zip(labels["prompt"], labels["text_generated"])]
    assert table.column("response").to_pylist() == responses
    np.testing.assert_array_equal(vectors, store["pooled"][:, 0])  # layer 1, the store's first
    info = nla_table_info(data / "nla" / "nla.parquet")
    assert (info.layer, info.pooling, info.mode, info.tokens) == (1, "mean", "generate", 8)
    assert info.model["sha256"] == store.attrs["model"]["sha256"] and info.store == "data/hidden/full.zarr"
    assert nla_table_info(data / "nla" / "nla_eval.parquet").store == "data/hidden/test.zarr"


def test_an_nla_table_without_its_metadata_is_refused_naming_what_to_rerun(tmp_path):
    from latentlab.common.errors import InputError
    from latentlab.hidden.nla_table import nla_table_info

    pq.write_table(pa.table({"id": [0], "prompt": ["1+2="], "response": ["1+2=3"]}), tmp_path / "old.parquet")
    with pytest.raises(InputError, match="which layer.*dvc repro nla_table"):
        nla_table_info(tmp_path / "old.parquet")


def test_params_refuse_shards_of_partial_batches():
    from stages.params import LabelParams

    with pytest.raises(ValueError, match="multiple of batch_size"):
        LabelParams(batch_size=64, shard_rows=100)
