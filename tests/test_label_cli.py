"""`latentlab label` and `latentlab info`: real prompt files through the real tiny model, the same
store as the label stage, resume after SIGKILL, and one-line errors that leave nothing behind."""

import json
import signal
import subprocess
import sys
import time

import numpy as np
import polars as pl
import pytest
import zarr

from latentlab.cli import main as cli
from latentlab.common.errors import InputError
from latentlab.hidden.info import describe_store, hook_name
from latentlab.hidden.prompts import read_prompts
from latentlab.hidden.store import open_store
from tests.label_fixtures import ENV, REPO, run_stage, save_model, scratch_repo, tree_bytes

PROMPTS = ["1+2=", "13-4=", "7+19=", "0-0=", "19+19=", "5-17=", "3+3=", "11-9=", "4+15="]
# generation with per-token states and several shards: the settings that exercise the most
OPTIONS = ["--layers", "0", "1", "-1", "--tokens", "6", "--store-tokens", "--batch-size", "2", "--shard-rows", "4"]
GENERATED = ["id", "prompt", "n_positions", "text_generated", "token_ids", "n_tokens", "ended", "log_prob"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tiny_lm):
    return save_model(tiny_lm, tmp_path_factory.mktemp("tiny"))


def label_cli(model_dir, prompts, out, *options):
    cli(["label", "--model", str(model_dir), "--prompts", str(prompts), "--out", str(out), *options])


def assert_one_line(stderr, message):
    """The error is one line (the last: loading the model may have drawn a progress bar), no traceback."""
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and message in last and "Traceback" not in stderr, stderr


def files(directory):
    return sorted(str(f.relative_to(directory)) for f in directory.rglob("*"))


def write_prompt_files(directory, prompts):
    """The same prompts as plain text, JSON Lines (field `text`) and Parquet (column `text`, with ids)."""
    (directory / "p.txt").write_text("".join(p + "\n" for p in prompts))
    (directory / "p.jsonl").write_text("".join(json.dumps({"text": p, "n": i}) + "\n\n" for i, p in enumerate(prompts)))
    pl.DataFrame({"id": range(len(prompts)), "text": prompts}).write_parquet(directory / "p.parquet")
    return [directory / "p.txt", directory / "p.jsonl", directory / "p.parquet"]


def test_text_jsonl_and_parquet_prompts_give_one_store_with_hook_names(model_dir, tmp_path, capsys):
    inputs = write_prompt_files(tmp_path, PROMPTS)
    for source in inputs:
        column = [] if source.suffix == ".txt" else ["--column", "text"]
        # the same store name: the job's name seeds the sampling, so the stores must be identical
        label_cli(model_dir, source, tmp_path / source.suffix[1:] / "p.zarr", *OPTIONS, *column)
    assert "9 rows of" in capsys.readouterr().out
    first = tmp_path / "txt"
    assert files(first) == ["p.parquet", "p.zarr", *sorted(f"p.zarr/{f}" for f in files(first / "p.zarr"))]
    for other in ("jsonl", "parquet"):
        assert tree_bytes(tmp_path / other / "p.zarr") == tree_bytes(first / "p.zarr")
        assert pl.read_parquet(tmp_path / other / "p.parquet").equals(pl.read_parquet(first / "p.parquet"))

    store = open_store(first / "p.zarr")
    assert store["pooled"].shape == (9, 3, 32) and store["tokens"].shape == (9, 6, 3, 32)
    assert store.attrs["layers"] == [0, 1, -1] and store.attrs["layer_indices"] == [0, 1, 2]
    assert store.attrs["hook_names"] == [
        "blocks.0.hook_resid_pre",
        "blocks.1.hook_resid_pre",
        "ln_final.hook_normalized",
    ]
    table = pl.read_parquet(first / "p.parquet")
    assert table.columns == GENERATED and table["prompt"].to_list() == PROMPTS
    assert table["id"].to_list() == list(range(9)) and table["n_tokens"].to_list() == store["n_positions"][:].tolist()


def test_hook_names_follow_output_hidden_states_numbering():
    assert [hook_name(i, 4) for i in range(5)] == [
        "blocks.0.hook_resid_pre",  # the embeddings
        "blocks.1.hook_resid_pre",
        "blocks.2.hook_resid_pre",
        "blocks.3.hook_resid_pre",
        "ln_final.hook_normalized",  # -1: the final norm's output
    ]
    with pytest.raises(IndexError):
        hook_name(5, 4)


def test_cli_writes_what_the_label_stage_writes_for_the_same_rows(model_dir, tmp_path):
    settings = {"datasets": ["test"], "layers": [1, -1]}
    settings |= {"tokens": 6, "store_tokens": True, "batch_size": 8, "shard_rows": 16}
    repo = scratch_repo(tmp_path / "repo", model_dir, settings)
    run_stage(repo)
    rows = repo / "data" / "synth" / "test.parquet"
    options = ["--layers", "1", "-1", "--tokens", "6", "--store-tokens", "--batch-size", "8", "--shard-rows", "16"]
    label_cli(repo / "models" / "base", rows, tmp_path / "cli" / "test.zarr", *options, "--seed", "0")

    stage = zarr.open_group(repo / "data" / "hidden" / "test.zarr", mode="r")
    mine = zarr.open_group(tmp_path / "cli" / "test.zarr", mode="r")
    for name in ("pooled", "tokens", "ids", "n_positions"):
        np.testing.assert_array_equal(mine[name][:], stage[name][:])
    # the attributes differ only in the fingerprint (the stage's config holds its own extra keys) and the model's path
    differ = {k for k in stage.attrs if stage.attrs[k] != mine.attrs[k]}
    assert differ == {"fingerprint", "model"}
    assert mine.attrs["model"]["sha256"] == stage.attrs["model"]["sha256"]
    stage_rows = pl.read_parquet(repo / "data" / "labels" / "test.parquet").select(GENERATED)
    assert pl.read_parquet(tmp_path / "cli" / "test.parquet").equals(stage_rows)


def test_killed_run_resumes_to_the_same_store_and_info_tells_it_is_unfinished(model_dir, tmp_path, capsys):
    prompts = [f"{a}+{b}=" for a in range(20) for b in range(20)]  # 400 rows, 100 shards of 4
    (tmp_path / "p.txt").write_text("\n".join(prompts))
    out, reference = tmp_path / "run" / "p.zarr", tmp_path / "reference" / "p.zarr"
    label_cli(model_dir, tmp_path / "p.txt", reference, *OPTIONS)

    command = [sys.executable, "-m", "latentlab.cli", "label", "--model", str(model_dir)]
    command += ["--prompts", str(tmp_path / "p.txt"), "--out", str(out), *OPTIONS]
    process = subprocess.Popen(command, cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    done, deadline = tmp_path / "run" / ".p.zarr.work" / "done", time.monotonic() + 120
    while not done.is_dir() or len(list(done.iterdir())) < 3:
        assert process.poll() is None, "the run ended before it could be killed:\n" + process.stdout.read()[-2000:]
        assert time.monotonic() < deadline
        time.sleep(0.005)
    process.send_signal(signal.SIGKILL)
    process.wait()
    shards_done = len(list(done.iterdir()))
    assert shards_done < 100, "killed too late to test a resume"
    assert files(tmp_path / "run") == [
        ".p.zarr.work",
        *[f".p.zarr.work/{f}" for f in files(out.parent / ".p.zarr.work")],
    ]

    capsys.readouterr()
    cli(["info", str(out), "--json"])
    report = json.loads(capsys.readouterr().out)
    assert report["complete"] is False and report["shards_done"] == shards_done and report["rows"] == 400

    label_cli(model_dir, tmp_path / "p.txt", out, *OPTIONS)
    assert f"resuming, {shards_done} of 100 shard(s) already done" in capsys.readouterr().out
    assert tree_bytes(out) == tree_bytes(reference)
    assert pl.read_parquet(out.with_suffix(".parquet")).equals(pl.read_parquet(reference.with_suffix(".parquet")))
    assert files(tmp_path / "run") == ["p.parquet", "p.zarr", *[f"p.zarr/{f}" for f in files(out)]]


def test_info_reports_a_store_in_words_and_json(model_dir, tmp_path, capsys):
    (tmp_path / "p.txt").write_text("\n".join(PROMPTS))
    label_cli(model_dir, tmp_path / "p.txt", tmp_path / "p.zarr", *OPTIONS)
    capsys.readouterr()
    cli(["info", str(tmp_path / "p.zarr"), "--json"])
    report = json.loads(capsys.readouterr().out)
    assert report["complete"] is True and report["rows"] == 9 and report["mode"] == "generate"
    assert report["tokens"] == 6 and report["dtype"] == "float32" and report["hidden_size"] == 32
    assert report["model"]["sha256"] == open_store(tmp_path / "p.zarr").attrs["model"]["sha256"]
    assert [layer["hook_name"] for layer in report["layers"]][2] == "ln_final.hook_normalized"
    assert report["layers"][2] == {"layer": -1, "index": 2, "hook_name": "ln_final.hook_normalized"}
    assert report["arrays"]["tokens"]["shape"] == [9, 6, 3, 32] and report["arrays"]["tokens"]["dtype"] == "float16"
    on_disk = [f for f in (tmp_path / "p.zarr").rglob("*") if f.is_file()]
    assert report["bytes"] == sum(f.stat().st_size for f in on_disk) and report["files"] == len(on_disk)

    cli(["info", str(tmp_path / "p.zarr")])
    text = capsys.readouterr().out
    assert text.startswith(f"{tmp_path / 'p.zarr'}: complete")
    assert "-1 (output_hidden_states[2]) = ln_final.hook_normalized" in text
    assert report["model"]["sha256"] in text and "generate, 6 tokens" in text


def test_a_store_written_before_hook_names_still_opens_and_gets_them(model_dir, tmp_path):
    (tmp_path / "p.txt").write_text("\n".join(PROMPTS))
    label_cli(model_dir, tmp_path / "p.txt", tmp_path / "p.zarr", "--layers", "1", "-1")
    group = zarr.open_group(tmp_path / "p.zarr", mode="r+")
    del group.attrs["hook_names"], group.attrs["num_blocks"]  # what earlier versions wrote
    assert open_store(tmp_path / "p.zarr")["pooled"].shape == (9, 2, 32)
    names = [layer["hook_name"] for layer in describe_store(tmp_path / "p.zarr")["layers"]]
    assert names == ["blocks.1.hook_resid_pre", "ln_final.hook_normalized"]  # -1 at index 2: 2 blocks


@pytest.mark.parametrize(
    "name, content, options, message",
    [
        ("empty.txt", "", [], "empty.txt is empty: no prompts to label"),
        ("blank.jsonl", "\n\n", [], "blank.jsonl is empty: no prompts to label"),
        ("empty.parquet", pl.DataFrame({"prompt": []}, schema={"prompt": pl.String}), [], "empty: no prompts"),
        ("p.parquet", pl.DataFrame({"text": ["1+1="]}), [], "p.parquet has no column 'prompt' (it has ['text'])"),
        ("p.jsonl", '{"prompt": "1+1="}\n{"text": "2+2="}\n', [], "p.jsonl: line 2 has no field 'prompt' (['text'])"),
        ("p.jsonl", '{"prompt": "1+1="}\n{"prompt": 3}\n', [], "p.jsonl: line 2: field 'prompt' is not a string"),
        ("p.jsonl", '{"prompt": "1+1="}\nnot json\n', [], "p.jsonl: line 2 is not JSON"),
        (
            "long.txt",
            "1+1=\n" + "9" * 60 + "=\n",
            ["--tokens", "8"],
            r"long.txt: row id=1: 61 prompt tokens + 8 more exceed the model's context of 64 positions",
        ),
        ("p.txt", "1+1=\n\n2+2=\n", [], "p.txt: row id=1: the prompt is empty after tokenization"),
        ("p.txt", "1+1=\n", ["--layers", "3"], "layers: layer 3 is out of range"),
        ("p.txt", "1+1=\n", ["--top-p", "2"], "--top-p: Input should be less than or equal to 1"),
    ],
)
def test_bad_inputs_stop_in_one_line_and_write_nothing(model_dir, tmp_path, capsys, name, content, options, message):
    inputs = tmp_path / "in"
    inputs.mkdir()
    if isinstance(content, str):
        (inputs / name).write_text(content)
    else:
        content.write_parquet(inputs / name)
    with pytest.raises(SystemExit):
        label_cli(model_dir, inputs / name, tmp_path / "out" / "p.zarr", *options)
    assert_one_line(capsys.readouterr().err, message)
    assert files(tmp_path) == ["in", f"in/{name}"]


def test_a_missing_model_or_an_unwritable_output_stops_before_any_work(model_dir, tmp_path, capsys):
    (tmp_path / "p.txt").write_text("1+1=\n")
    (tmp_path / "file").write_text("not a directory")
    cases = [
        (tmp_path / "nowhere", tmp_path / "out.zarr", f"--model {tmp_path / 'nowhere'}: no such model directory"),
        (tmp_path, tmp_path / "out.zarr", f"{tmp_path} is not a Hugging Face model directory: no config.json"),
        (
            model_dir,
            tmp_path / "file" / "out.zarr",
            f"cannot write {tmp_path}/file/out.zarr: {tmp_path}/file is a file",
        ),
    ]
    for model, out, message in cases:
        with pytest.raises(SystemExit):
            label_cli(model, tmp_path / "p.txt", out)
        assert_one_line(capsys.readouterr().err, message)
    assert files(tmp_path) == ["file", "p.txt"]


def test_info_names_what_is_not_a_store(tmp_path, capsys):
    with pytest.raises(SystemExit):
        cli(["info", str(tmp_path / "nothing.zarr")])
    assert f"{tmp_path / 'nothing.zarr'} is not a Zarr store (no zarr.json)" in capsys.readouterr().err


def test_torchrun_two_ranks_label_the_same_store_as_one_process(model_dir, tmp_path):
    (tmp_path / "p.txt").write_text("\n".join(PROMPTS * 3))
    label_cli(model_dir, tmp_path / "p.txt", tmp_path / "one" / "p.zarr", *OPTIONS)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m"]
    command += ["latentlab.cli", "label", "--model", str(model_dir), "--prompts", str(tmp_path / "p.txt")]
    command += ["--out", str(tmp_path / "two" / "p.zarr"), *OPTIONS]
    result = subprocess.run(command, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert tree_bytes(tmp_path / "two") == tree_bytes(tmp_path / "one")


def flip_middle(path):
    """Damage a file the way a bad disk or a truncated copy does: 16 bytes in its middle inverted."""
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle - 8 : middle + 8] = bytes(b ^ 0xFF for b in data[middle - 8 : middle + 8])
    path.write_bytes(bytes(data))


def test_info_verify_reads_every_chunk_and_names_the_first_damaged_one(model_dir, tmp_path, capsys):
    (tmp_path / "p.txt").write_text("\n".join(PROMPTS))
    store = tmp_path / "p.zarr"
    label_cli(model_dir, tmp_path / "p.txt", store, *OPTIONS)
    capsys.readouterr()
    cli(["info", str(store), "--verify"])
    out = capsys.readouterr().out
    assert out.startswith(f"{store}: complete, verified") and "every chunk of 4 arrays read back" in out

    flip_middle(store / "pooled" / "c" / "1" / "0" / "0")  # the second of 3 shard files
    cli(["info", str(store)])  # the report alone reads no chunk
    assert capsys.readouterr().out.startswith(f"{store}: complete (not verified")
    with pytest.raises(SystemExit) as stop:
        cli(["info", str(store), "--verify"])
    assert stop.value.code == 1
    err = capsys.readouterr().err
    assert_one_line(err, f"{store}: array 'pooled' is damaged: its file {store / 'pooled/c/1/0/0'} (rows 4..8)")
    assert "dvc pull" in err.strip().splitlines()[-1]


@pytest.mark.parametrize("prefix", ["", "\ufeff"])
@pytest.mark.parametrize("suffix", [".txt", ".jsonl"])
def test_prompts_with_a_byte_order_mark_read_as_without(tmp_path, prefix, suffix):
    lines = (
        PROMPTS[:3] if suffix == ".txt" else [json.dumps({"id": i + 5, "prompt": p}) for i, p in enumerate(PROMPTS[:3])]
    )
    path = tmp_path / f"p{suffix}"
    path.write_bytes((prefix + "\n".join(lines) + "\n").encode("utf-8"))
    rows = read_prompts(path)
    assert rows["prompt"].to_list() == PROMPTS[:3]
    assert rows["id"].to_list() == ([0, 1, 2] if suffix == ".txt" else [5, 6, 7])


def test_duplicate_ids_are_refused_naming_the_id_and_where(tmp_path):
    lines = ['{"id": 1, "prompt": "1+1="}', '{"id": 2, "prompt": "2+2="}', "", '{"id": 1, "prompt": "3+3="}']
    (tmp_path / "p.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(InputError, match=r"p.jsonl: id 1 appears on lines 1 and 4; ids must be unique"):
        read_prompts(tmp_path / "p.jsonl")
    pl.DataFrame({"id": [7, 8, 7, 8], "prompt": ["a", "b", "c", "d"]}).write_parquet(tmp_path / "p.parquet")
    with pytest.raises(InputError, match=r"p.parquet: id 7 appears in rows 0 and 2; ids must be unique"):
        read_prompts(tmp_path / "p.parquet")
