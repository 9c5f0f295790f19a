"""The label run's store and table, written with less fixed cost: the same bytes, the same guarantees."""

import gc

import numpy as np
import polars as pl
import pytest
import zarr
from polars.testing import assert_frame_equal

from latentlab.hidden import labelling
from latentlab.hidden.extract import Extractor
from latentlab.hidden.labelling import LabelConfig, label, prepare
from latentlab.hidden.store import COMPRESSORS, open_store, store_metadata, write_store

PROMPTS = ["1+2=", "13-4=", "7+19=", "0-0=", "19+19=", "5-17=", "3+3=", "11-9=", "4+15=", "8-2="]


@pytest.mark.parametrize("compression", list(COMPRESSORS))
def test_store_metadata_is_byte_for_byte_what_zarr_create_array_writes(tmp_path, compression):
    """The documents written at once are those the array-by-array creation wrote (the reference below)."""
    attrs = {"format": "x", "complete": False, "layers": [2, -1]}
    rows, layers, hidden, width, batch_rows, shard_rows = 10, 2, 16, 5, 4, 8
    reference = zarr.open_group(tmp_path / "reference.zarr", mode="w", zarr_format=3, attributes=attrs)
    compressors = COMPRESSORS[compression]
    for name, shape, dtype, chunks, shards, codecs in [
        (
            "pooled",
            (rows, layers, hidden),
            "float32",
            (batch_rows, layers, hidden),
            (shard_rows, layers, hidden),
            compressors,
        ),
        ("ids", (rows,), "int64", (shard_rows,), None, COMPRESSORS["zstd"]),
        ("n_positions", (rows,), "int32", (shard_rows,), None, COMPRESSORS["zstd"]),
        (
            "tokens",
            (rows, width, layers, hidden),
            "float16",
            (batch_rows, width, 1, hidden),
            (shard_rows, width, layers, hidden),
            compressors,
        ),
    ]:
        reference.create_array(
            name, shape=shape, dtype=dtype, chunks=chunks, shards=shards, fill_value=0, compressors=codecs
        )
    nodes = store_metadata(rows, layers, hidden, width, attrs, batch_rows, shard_rows, compression)
    write_store(tmp_path / "written.zarr", nodes)
    files = {
        store: {
            str(p.relative_to(tmp_path / store)): p.read_bytes() for p in (tmp_path / store).rglob("*") if p.is_file()
        }
        for store in ("reference.zarr", "written.zarr")
    }
    assert sorted(files["written.zarr"]) == [
        "ids/zarr.json",
        "n_positions/zarr.json",
        "pooled/zarr.json",
        "tokens/zarr.json",
        "zarr.json",
    ]
    assert files["written.zarr"] == files["reference.zarr"]


def test_write_store_replaces_whatever_was_there(tmp_path):
    first = write_store(tmp_path / "s.zarr", store_metadata(4, 1, 8, 3, {"run": 1}, 2, 4))[""]
    first["tokens"][:] = 1
    second = write_store(tmp_path / "s.zarr", store_metadata(6, 2, 8, None, {"run": 2}, 2, 4))[""]
    assert sorted(second.array_keys()) == ["ids", "n_positions", "pooled"]
    assert zarr.open_group(tmp_path / "s.zarr", mode="r").attrs.asdict() == {"run": 2}
    assert second["pooled"].shape == (6, 2, 8) and not (tmp_path / "s.zarr" / "tokens").exists()


def _label(tiny_lm, tmp_path, name, shard_rows, temperature=1.0):
    extractor, job = _job(tiny_lm, shard_rows, temperature)
    out = tmp_path / name
    label(extractor, job, out / "rows.zarr", out / "rows.parquet", out / "work")
    return out


def test_a_single_shard_table_equals_a_multi_shard_table_row_for_row(tiny_lm, tmp_path):
    """One shard: its rows file is the table; several: streamed together. The same rows either way.
    Greedy, as the shards group other rows into batches (by length, within a shard): the padding, and so
    the last bits, differ, the tokens do not."""
    one, three = _label(tiny_lm, tmp_path, "one", 16, 0.0), _label(tiny_lm, tmp_path, "three", 4, 0.0)
    single, streamed = pl.read_parquet(one / "rows.parquet"), pl.read_parquet(three / "rows.parquet")
    assert single.height == len(PROMPTS) and single["token_ids"].dtype == pl.List(pl.Int32)
    assert_frame_equal(single, streamed, check_exact=False, rel_tol=0, abs_tol=1e-5)
    a, b = open_store(one / "rows.zarr"), open_store(three / "rows.zarr")
    for name, atol in (("pooled", 1e-5), ("tokens", 2e-3), ("ids", 0), ("n_positions", 0)):
        np.testing.assert_allclose(a[name][:], b[name][:], rtol=0, atol=atol)
    assert not (one / "work").exists() and not (three / "work").exists()


def test_a_run_killed_after_its_single_shard_table_finishes_on_rerun(tiny_lm, tmp_path, monkeypatch):
    """The table is a copy of the shard's rows, not the rows moved away: a rerun still finds them."""
    expected = _label(tiny_lm, tmp_path, "uninterrupted", 16)

    def killed(*args):
        raise KeyboardInterrupt("killed before the store moved into place")

    with monkeypatch.context() as patch:
        patch.setattr(labelling.shutil, "move", killed)
        with pytest.raises(KeyboardInterrupt):
            _label(tiny_lm, tmp_path, "killed", 16)
    out = tmp_path / "killed"
    assert (out / "rows.parquet").exists() and not (out / "rows.zarr").exists()

    _label(tiny_lm, tmp_path, "killed", 16)  # the rerun: every shard is done, it only finishes
    _assert_same_outputs(out, expected)


def _job(tiny_lm, shard_rows, temperature=1.0):
    model, tokenizer = tiny_lm
    cfg = LabelConfig(
        layers=[1, -1], tokens=4, store_tokens=True, batch_size=2, shard_rows=shard_rows, temperature=temperature
    )
    extractor = Extractor(model, tokenizer, cfg)
    rows = pl.DataFrame({"id": list(range(100, 100 + len(PROMPTS))), "prompt": PROMPTS})
    return extractor, prepare(extractor, "rows", rows, cfg, 0, {"source": "test"})


def _assert_same_outputs(out, expected):
    assert (out / "rows.parquet").read_bytes() == (expected / "rows.parquet").read_bytes()
    a, b = open_store(out / "rows.zarr"), open_store(expected / "rows.zarr")
    assert a.attrs.asdict() == b.attrs.asdict()
    for name in ("pooled", "tokens", "ids", "n_positions"):
        np.testing.assert_array_equal(a[name][:], b[name][:])
    assert not (out / "work").exists()


def test_what_a_kill_while_the_store_is_written_leaves_is_started_over(tiny_lm, tmp_path, capsys):
    """A kill while the empty store's documents are written leaves a hidden partial store (never
    resumed) beside the empty done directory; the rerun starts over."""
    expected = _label(tiny_lm, tmp_path, "uninterrupted", 4)
    extractor, job = _job(tiny_lm, 4)
    out = tmp_path / "killed"
    partial = out / "work" / f".store.zarr.partial-{12345}"
    (out / "work" / "done").mkdir(parents=True)
    nodes = labelling._store_nodes(extractor, job)
    write_store(partial, {name: node for name, node in nodes.items() if name != "pooled"})  # half the documents
    label(extractor, job, out / "rows.zarr", out / "rows.parquet", out / "work")
    assert "resuming" not in capsys.readouterr().out
    _assert_same_outputs(out, expected)


def test_what_a_kill_during_the_first_shard_leaves_resumes(tiny_lm, tmp_path, capsys):
    """The store written, no shard done yet (killed while shard 0 was computed): the rerun resumes it."""
    expected = _label(tiny_lm, tmp_path, "uninterrupted", 4)
    extractor, job = _job(tiny_lm, 4)
    out = tmp_path / "killed"
    labelling._start_or_resume(extractor, job, out / "work")  # the empty store, as the killed run left it
    assert (out / "work" / "store.zarr" / "zarr.json").exists() and not any((out / "work" / "done").iterdir())
    label(extractor, job, out / "rows.zarr", out / "rows.parquet", out / "work")
    assert "resuming, 0 of 3 shard(s) already done" in capsys.readouterr().out
    _assert_same_outputs(out, expected)


def test_a_run_never_thaws_a_frozen_heap(tiny_lm, tmp_path):
    """`gc.unfreeze` thaws everything: a run that thawed a caller's frozen heap (or its own, from an earlier
    run) would leave the model's objects to be walked by the next full collection (it made each benchmark run
    after the first ~20% slower)."""
    gc.freeze()  # a caller that froze its heap, as a server or a benchmark does
    frozen = gc.get_freeze_count()
    _label(tiny_lm, tmp_path, "frozen", 16)
    assert gc.get_freeze_count() >= frozen
