import os
import stat
import tempfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from latentlab.common.atomic import OutputError, atomic_output


def test_success_replaces_the_target(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "old.txt").write_text("old")
    with atomic_output(target) as partial:
        partial.mkdir()
        (partial / "new.txt").write_text("new")
    assert sorted(p.name for p in target.iterdir()) == ["new.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_failure_leaves_no_output_and_no_partial(tmp_path):
    target = tmp_path / "model"
    with pytest.raises(RuntimeError):
        with atomic_output(target) as partial:
            partial.mkdir()
            (partial / "weights").write_text("half")
            raise RuntimeError("killed half-way")
    assert list(tmp_path.iterdir()) == []


def test_stale_partials_of_a_killed_run_are_swept(tmp_path):
    stale = tmp_path / ".metrics.json.partial-99999"
    stale.write_text("{")
    with atomic_output(tmp_path / "metrics.json") as partial:
        partial.write_text("{}")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json"]


def test_writing_nothing_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError):
        with atomic_output(tmp_path / "x"):
            pass


def test_a_directory_is_never_replaced_by_a_file_nor_a_file_by_a_directory(tmp_path):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "weights").write_text("keep")
    (tmp_path / "table.parquet").write_text("keep")
    with pytest.raises(OutputError, match=r"model is a directory; .* not replaced by a file"):
        with atomic_output(tmp_path / "model") as partial:
            partial.write_text("a file")
    with pytest.raises(OutputError, match=r"table.parquet is a file; .* not replaced by a directory"):
        with atomic_output(tmp_path / "table.parquet") as partial:
            partial.mkdir()
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")) == [
        "model",
        "model/weights",
        "table.parquet",
    ]
    assert (tmp_path / "model" / "weights").read_text() == "keep" == (tmp_path / "table.parquet").read_text()


def test_callers_say_what_they_may_replace_and_are_refused_before_any_work(tmp_path):
    store = tmp_path / "x.zarr"
    store.mkdir()
    (store / "weights").write_text("someone else's")
    ran = []
    for replaces in ("zarr.json", lambda path: (path / "zarr.json").is_file()):
        with pytest.raises(OutputError, match=r"x.zarr exists and is not a Zarr store; .*remove it"):
            with atomic_output(store, replaces=replaces, what="a Zarr store") as partial:
                ran.append(partial)
    assert ran == [] and (store / "weights").read_text() == "someone else's"
    (store / "zarr.json").write_text("{}")  # now it is one: replaced
    with atomic_output(store, replaces="zarr.json", what="a Zarr store") as partial:
        partial.mkdir()
        (partial / "zarr.json").write_text("{}")
    assert sorted(p.name for p in store.iterdir()) == ["zarr.json"]
    with atomic_output(tmp_path / "new.zarr", replaces="zarr.json") as partial:  # nothing there: written
        partial.mkdir()
    assert (tmp_path / "new.zarr").is_dir()


@pytest.mark.parametrize("umask", [0o022, 0o027], ids=["umask022", "umask027"])
def test_outputs_get_the_modes_open_gives_not_the_private_ones_of_temporary_files(tmp_path, umask):
    previous = os.umask(umask)
    try:
        with atomic_output(tmp_path / "model") as partial:
            partial.mkdir()
            private = Path(tempfile.mkdtemp(dir=partial))  # 0700, as mkdtemp makes it
            (private / "a.json").write_text("{}")
            save_file({"w": torch.zeros(3)}, str(partial / "model.safetensors"))  # safetensors writes 0600
            os.close(os.open(partial / "run.sh", os.O_CREAT | os.O_WRONLY, 0o700))
        with atomic_output(tmp_path / "one.json") as partial:
            os.close(os.open(partial, os.O_CREAT | os.O_WRONLY, 0o600))
    finally:
        os.umask(previous)
    model = tmp_path / "model"
    modes = {str(p.relative_to(tmp_path)): stat.S_IMODE(p.stat().st_mode) for p in [model, *model.rglob("*")]}
    directory, file = 0o777 & ~umask, 0o666 & ~umask
    assert modes == {
        "model": directory,
        f"model/{private.name}": directory,
        f"model/{private.name}/a.json": file,
        "model/model.safetensors": file,
        "model/run.sh": directory,  # executable stays executable
    }
    assert stat.S_IMODE((tmp_path / "one.json").stat().st_mode) == file
