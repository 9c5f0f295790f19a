"""Every `latentlab` command that writes refuses to lose what it did not write: an `--out` that is not a
store of its own kind, an output that is an input, a table where a user's file stands (issue 26)."""

import shutil

import numpy as np
import polars as pl
import pytest

from latentlab.cli import main as cli
from latentlab.hidden.store import open_store
from tests.label_fixtures import save_model, tree_bytes


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tiny_lm):
    return save_model(tiny_lm, tmp_path_factory.mktemp("tiny") / "model")


def label_cli(model, prompts, out, *options):
    cli(["label", "--model", str(model), "--prompts", str(prompts), "--out", str(out), "--device", "cpu", *options])


def refused(capsys, command, message):
    """`command` stops with exit status 1 and one line `error: ...` holding `message`."""
    with pytest.raises(SystemExit) as stop:
        command()
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]
    assert stop.value.code == 1 and last.startswith("error: ") and message in last and "Traceback" not in err, err
    return last


def snapshot(directory):
    """Every file and directory under `directory`, with the bytes of the files."""
    return {str(p.relative_to(directory)): p.read_bytes() if p.is_file() else None for p in directory.rglob("*")}


def test_label_out_on_a_model_directory_is_refused_and_nothing_is_touched(model_dir, tmp_path, capsys):
    clob = tmp_path / "clob"
    shutil.copytree(model_dir, clob / "mymodel")
    (clob / "mymodel.parquet").write_bytes(b"the user's own table")
    (tmp_path / "p.txt").write_text("1+1=\n2+2=\n")
    before = snapshot(clob)
    out = clob / "mymodel"
    refused(capsys, lambda: label_cli(model_dir, tmp_path / "p.txt", out), f"--out {out} exists and is not a")
    assert snapshot(clob) == before


def test_label_never_writes_its_table_over_the_prompts(model_dir, tmp_path, capsys):
    clob = tmp_path / "clob"
    clob.mkdir()
    pl.DataFrame({"id": [0, 1], "prompt": ["1+1=", "2+2="]}).write_parquet(clob / "test.parquet")
    before = snapshot(clob)
    line = refused(
        capsys,
        lambda: label_cli(model_dir, clob / "test.parquet", clob / "test.zarr"),
        f"{clob / 'test.parquet'} is the --prompts file",
    )
    assert "--table" in line  # what to do: name the table elsewhere
    assert snapshot(clob) == before


@pytest.mark.parametrize(
    "out, options, message",
    [
        ("p.txt", [], "--out {root}/p.txt is the --prompts file"),
        ("model", [], "--out {root}/model is the --model directory"),
        ("x.zarr", ["--table", "{root}/p.txt"], "--table {root}/p.txt is the --prompts file"),
        (
            "x.zarr",
            ["--table", "{root}/model/config.json"],
            "--table {root}/model/config.json exists and is not a table latentlab wrote",
        ),
        ("x.parquet", [], "the row table {root}/x.parquet is --out itself"),
        ("x.zarr", ["--table", "{root}/x.zarr"], "--table {root}/x.zarr is --out itself"),
    ],
)
def test_label_outputs_equal_to_an_input_are_refused(model_dir, tmp_path, capsys, out, options, message):
    shutil.copytree(model_dir, tmp_path / "model")
    (tmp_path / "p.txt").write_text("1+1=\n2+2=\n")
    before = snapshot(tmp_path)
    options = [o.format(root=tmp_path) for o in options]
    refused(
        capsys,
        lambda: label_cli(tmp_path / "model", tmp_path / "p.txt", tmp_path / out, *options),
        message.format(root=tmp_path),
    )
    assert snapshot(tmp_path) == before


def test_prompts_inside_the_store_to_replace_are_refused(model_dir, tmp_path, capsys):
    (tmp_path / "p.txt").write_text("1+1=\n2+2=\n")
    label_cli(model_dir, tmp_path / "p.txt", tmp_path / "s.zarr")
    shutil.copy(tmp_path / "p.txt", tmp_path / "s.zarr" / "p.txt")
    before = snapshot(tmp_path)
    refused(
        capsys,
        lambda: label_cli(model_dir, tmp_path / "s.zarr" / "p.txt", tmp_path / "s.zarr"),
        f"--prompts {tmp_path / 's.zarr' / 'p.txt'} is inside --out {tmp_path / 's.zarr'}",
    )
    assert snapshot(tmp_path) == before


def test_a_table_that_is_not_a_row_table_is_refused_and_an_own_store_is_replaced(model_dir, tmp_path, capsys):
    (tmp_path / "p.txt").write_text("1+1=\n2+2=\n")
    problems = pl.DataFrame({"id": [0, 1], "prompt": ["1+1=", "2+2="], "answer": ["2", "4"]})
    problems.write_parquet(tmp_path / "x.parquet")  # the user's data where the row table would go
    before = snapshot(tmp_path)
    refused(
        capsys,
        lambda: label_cli(model_dir, tmp_path / "p.txt", tmp_path / "x.zarr"),
        f"the row table {tmp_path / 'x.parquet'} exists and is not a table latentlab wrote",
    )
    assert snapshot(tmp_path) == before

    # a store and table of latentlab's own: a rerun replaces them, as documented
    label_cli(model_dir, tmp_path / "p.txt", tmp_path / "y.zarr", "--tokens", "3")
    (tmp_path / "q.txt").write_text("3+3=\n4+4=\n5+5=\n")
    label_cli(model_dir, tmp_path / "q.txt", tmp_path / "y.zarr")
    assert open_store(tmp_path / "y.zarr")["pooled"].shape[0] == 3
    assert pl.read_parquet(tmp_path / "y.parquet")["prompt"].to_list() == ["3+3=", "4+4=", "5+5="]


def test_an_out_that_is_a_file_or_another_zarr_group_is_refused(model_dir, tmp_path, capsys):
    import zarr

    (tmp_path / "p.txt").write_text("1+1=\n")
    (tmp_path / "notes.zarr").write_text("a file, not a store")
    zarr.open_group(tmp_path / "grid.zarr", mode="w").create_array("obs", shape=(2,), dtype="int8")
    before = snapshot(tmp_path)
    for name in ("notes.zarr", "grid.zarr"):
        out = tmp_path / name
        refused(
            capsys, lambda out=out: label_cli(model_dir, tmp_path / "p.txt", out), f"--out {out} exists and is not a"
        )
    assert snapshot(tmp_path) == before


def test_extract_refuses_to_overwrite_its_rows_or_the_model(model_dir, tmp_path, capsys):
    (tmp_path / "p.txt").write_text("1+1=\n2+2=\n")
    label_cli(model_dir, tmp_path / "p.txt", tmp_path / "s.zarr", "--tokens", "3")
    before = snapshot(tmp_path)
    rows = tmp_path / "s.parquet"
    common = ["extract", "--model", str(model_dir), "--rows", str(rows), "--device", "cpu"]
    refused(capsys, lambda: cli([*common, "--out", str(rows)]), f"--out {rows} is the --rows file")
    refused(
        capsys,
        lambda: cli([*common, "--out", str(tmp_path / "t.zarr"), "--table-out", str(rows)]),
        f"--table-out {rows} is the --rows file",
    )
    refused(capsys, lambda: cli([*common, "--out", str(model_dir)]), f"--out {model_dir} is the --model directory")
    assert snapshot(tmp_path) == before


def test_npz_export_and_import_refuse_to_lose_inputs_and_other_files(model_dir, tmp_path, capsys):
    (tmp_path / "p.txt").write_text("1+1=\n2+2=\n")
    label_cli(model_dir, tmp_path / "p.txt", tmp_path / "s.zarr", "--tokens", "3")
    (tmp_path / "dir.npz").mkdir()
    (tmp_path / "dir.npz" / "keep.txt").write_text("keep")
    (tmp_path / "notes.txt").write_text("not an archive")
    before = snapshot(tmp_path)
    store, table = tmp_path / "s.zarr", tmp_path / "s.parquet"
    export = ["npz", "export", str(store)]
    refused(capsys, lambda: cli([*export, str(table), "--table", str(table)]), f"{table} is the --table file")
    refused(capsys, lambda: cli([*export, str(store)]), f"{store} is the store")
    refused(capsys, lambda: cli([*export, str(tmp_path / "dir.npz")]), f"{tmp_path / 'dir.npz'} exists and is not")
    refused(capsys, lambda: cli([*export, str(tmp_path / "notes.txt")]), f"{tmp_path / 'notes.txt'} exists and is not")
    assert snapshot(tmp_path) == before

    cli([*export, str(tmp_path / "out.npz"), "--table", str(table)])
    cli([*export, str(tmp_path / "out.npz"), "--table", str(table)])  # its own archive: replaced
    with np.load(tmp_path / "out.npz") as data:
        assert data["hidden_state"].shape[0] == 2
    npz = tmp_path / "out.npz"
    before = snapshot(tmp_path)
    into = ["npz", "import", str(npz)]
    refused(capsys, lambda: cli([*into, str(model_dir)]), f"{model_dir} exists and is not a")
    refused(capsys, lambda: cli([*into, str(npz)]), f"{npz} is the .npz file")
    refused(capsys, lambda: cli([*into, str(tmp_path / "i.zarr"), "--table", str(npz)]), f"{npz} is the .npz file")
    refused(
        capsys,
        lambda: cli([*into, str(tmp_path / "i.zarr"), "--table", str(tmp_path / "p.txt")]),
        f"--table {tmp_path / 'p.txt'} exists and is not a table latentlab wrote",
    )
    assert snapshot(tmp_path) == before
    cli([*into, str(store), "--table", str(table)])  # over a store and table of its own kind: replaced
    assert open_store(store).attrs["mode"] == "imported"
    assert tree_bytes(tmp_path / "dir.npz") == {"keep.txt": b"keep"}


def test_any_failure_of_a_command_is_one_line(model_dir, capsys, monkeypatch):
    """The CLI's error boundary is the stages': an error no check foresaw (here `serve` on a port another socket
    holds: an OSError) is one line, exit 1, no traceback; LATENTLAB_DEBUG=1 shows the traceback instead."""
    import socket

    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = str(holder.getsockname()[1])
        command = ["serve", "--model", str(model_dir), "--layers", "-1", "--port", port, "--device", "cpu"]
        refused(capsys, lambda: cli(command), "in use")
        monkeypatch.setenv("LATENTLAB_DEBUG", "1")
        with pytest.raises(OSError):
            cli(command)
