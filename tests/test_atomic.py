import pytest

from latentlab.common.atomic import atomic_output


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
