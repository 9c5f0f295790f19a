"""One error boundary for every stage: each failure is one line naming the file, key or device and what to do.

Exit 2 for params errors (rerunning will not fix them), 1 otherwise; the traceback only under LATENTLAB_DEBUG=1.
The wrapper is called in process with a `main` that raises; real stages run as processes in a throwaway
directory, with a read-only or full output disk as a tmpfs mounted in a private mount namespace (`unshare -m`:
the tests run as root, for whom chmod 0555 changes nothing; they skip where mounting is not allowed).
"""

import errno
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from ruamel.yaml import YAML

from stages.common import UnwritableOutputError, check_writable, stage
from stages.params import ParamsError
from tests.dag import TINY

ROOT = Path(__file__).resolve().parents[1]
HINT = "  (LATENTLAB_DEBUG=1 shows the traceback)"


@pytest.fixture
def in_project(tmp_path, monkeypatch):
    """A directory with the project's params.yaml (and no dvc.yaml: no declared outputs to check) as the cwd."""
    shutil.copy(ROOT / "params.yaml", tmp_path)
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("LATENTLAB_DEBUG", raising=False)
    monkeypatch.delenv("RANK", raising=False)
    return tmp_path


def _fail(main, capsys) -> tuple[int, str]:
    with pytest.raises(SystemExit) as exit_:
        stage(main)()
    return exit_.value.code, capsys.readouterr().err


def _raises(error: BaseException):
    def main(params):
        raise error

    return main


def test_an_unexpected_error_is_one_line_with_its_type(in_project, capsys):
    code, err = _fail(_raises(RuntimeError("the kernel\nfailed")), capsys)
    assert (code, err) == (1, f"error: RuntimeError: the kernel failed{HINT}\n")


def test_a_params_error_exits_2(in_project, capsys):
    code, err = _fail(_raises(ParamsError("params.yaml: device: 'cuda' was asked for")), capsys)
    assert (code, err) == (2, f"error: params.yaml: device: 'cuda' was asked for{HINT}\n")


@pytest.mark.parametrize(
    "number, message",
    [
        (errno.ENOSPC, "models/.sft.partial-7/model.safetensors: no space left on its disk: free some space and rerun"),
        (errno.EROFS, "models/.sft.partial-7/model.safetensors: the file system is read-only: make it writable"),
        (errno.EACCES, "models/.sft.partial-7/model.safetensors: permission denied: check the owner and mode"),
    ],
)
def test_an_os_error_names_its_path(in_project, capsys, number, message):
    error = OSError(number, os.strerror(number), "models/.sft.partial-7/model.safetensors")
    code, err = _fail(_raises(error), capsys)
    assert code == 1 and err.startswith(f"error: {message}") and err.count("\n") == 1


def test_a_damaged_safetensors_file_read_by_any_loader_is_named(in_project, capsys):
    """A loader the stage calls (here safetensors' own load_file, as the add-on loaders do) hits a truncated file."""
    import torch
    from safetensors.torch import load_file, save_file

    path = in_project / "head.safetensors"
    save_file({"w": torch.zeros(64)}, path)
    path.write_bytes(path.read_bytes()[:50])
    code, err = _fail(lambda params: load_file(path), capsys)
    assert code == 1
    assert err.startswith(f"error: {path}: the file is damaged (Error while deserializing header")
    assert "rerun the stage that wrote it, or restore it with `dvc checkout`" in err and err.count("\n") == 1


def test_debug_shows_the_original_error(in_project, monkeypatch):
    monkeypatch.setenv("LATENTLAB_DEBUG", "1")
    with pytest.raises(RuntimeError, match="kernel"):
        stage(_raises(RuntimeError("kernel")))()


def test_a_rank_prefixes_its_line(in_project, capsys, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    code, err = _fail(_raises(KeyError("ids")), capsys)
    assert (code, err) == (1, f"rank 1: error: KeyError: 'ids'{HINT}\n")


# check_writable: outputs are checked before any work


def test_a_writable_output_passes_and_leaves_nothing_behind(tmp_path):
    check_writable(tmp_path / "models" / "sft", tmp_path / "plots" / "sft.csv", need_bytes=1000)
    assert list(tmp_path.iterdir()) == []


def test_a_file_where_a_directory_should_be(tmp_path):
    (tmp_path / "models").write_text("")
    with pytest.raises(
        UnwritableOutputError, match=f"{tmp_path / 'models' / 'sft'} cannot be written: {tmp_path / 'models'} is a file"
    ):
        check_writable(tmp_path / "models" / "sft")


def test_a_directory_the_kernel_refuses_files_in(tmp_path):
    """Root may write anywhere a mode allows: /proc refuses new files whoever asks."""
    with pytest.raises(UnwritableOutputError, match=r"/proc/latentlab/out cannot be written: /proc: "):
        check_writable("/proc/latentlab/out")


def test_too_little_space_is_refused_with_both_numbers(tmp_path):
    free = shutil.disk_usage(tmp_path).free
    with pytest.raises(
        UnwritableOutputError,
        match=rf"{tmp_path / 'model'} needs about [0-9.]+ [kMGT]B, but the disk of {tmp_path} has [0-9.]+ [kMGT]B free",
    ):
        check_writable(tmp_path / "model", need_bytes=free * 2)


# Real stages as processes


def _project(tmp_path: Path, **overrides) -> Path:
    yaml = YAML()
    data = yaml.load((ROOT / "params.yaml").read_text())
    for key, value in {**TINY, **overrides}.items():
        if isinstance(value, dict):
            data[key].update(value)
        else:
            data[key] = value
    with (tmp_path / "params.yaml").open("w") as handle:
        yaml.dump(data, handle)
    shutil.copy(ROOT / "dvc.yaml", tmp_path)
    return tmp_path


ENV = {**os.environ, "PYTHONPATH": str(ROOT), "WANDB_MODE": "disabled"}
ENV.pop("LATENTLAB_DEBUG", None)


def _stage(directory: Path, name: str, mount: str | None = None, **env) -> subprocess.CompletedProcess:
    """`python -m stages.<name>`, after `mount` (shell commands) in a private mount namespace when given."""
    command = [sys.executable, "-m", f"stages.{name}"]
    if mount:
        command = ["unshare", "-m", "sh", "-c", f'{mount} && exec "$0" "$@"', *command]
    return subprocess.run(command, cwd=directory, env={**ENV, **env}, capture_output=True, text=True, timeout=300)


def _one_line(result: subprocess.CompletedProcess) -> str:
    assert "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, result.stderr
    return lines[0].removesuffix(HINT)


@pytest.fixture(scope="module")
def can_mount(tmp_path_factory):
    target = tmp_path_factory.mktemp("mount")
    if not shutil.which("unshare"):
        pytest.skip("no unshare")
    probe = subprocess.run(["unshare", "-m", "mount", "-t", "tmpfs", "tmpfs", str(target)], capture_output=True)
    if probe.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {probe.stderr.decode().strip()}")


def _save_base(directory: Path) -> Path:
    from latentlab.lm.modeling import save_lm
    from tests.tiny import new_tiny_lm

    save_lm(*new_tiny_lm(), directory / "models" / "base", source="scratch")
    return directory / "models" / "base"


def test_a_read_only_output_disk_stops_the_stage_before_any_work(tmp_path, can_mount):
    """synth used to compute every split and then fail renaming into data/ with an OSError traceback."""
    directory = _project(tmp_path)
    (directory / "data").mkdir()
    result = _stage(directory, "synth", mount="mount -t tmpfs -o ro,size=1m tmpfs data")
    assert result.returncode == 1
    assert _one_line(result) == (
        "error: data/synth cannot be written: data: the file system is read-only: make it writable "
        "(or run the stage in a writable copy of the project) and rerun"
    )
    assert "problems" not in result.stdout  # nothing was computed


def test_a_full_output_disk_stops_a_training_stage_before_it_trains(tmp_path, can_mount):
    """sft used to train to the end and then fail writing the model (safetensors' ENOSPC, a traceback)."""
    directory = _project(tmp_path)
    assert _stage(directory, "synth").returncode == 0
    base = _save_base(directory)
    pages = sum(-(-file.stat().st_size // 4096) for file in base.iterdir())
    shutil.move(directory / "models", directory / "models.src")
    (directory / "models").mkdir()
    mount = f"mount -t tmpfs -o size={(pages + 3) * 4}k tmpfs models && cp -r models.src/base models/"
    result = _stage(directory, "sft", mount=mount)
    assert result.returncode == 1
    line = _one_line(result)
    assert line.startswith("error: models/sft needs about ") and ", but the disk of models has " in line
    assert line.endswith("free: free some space and rerun")
    assert not (directory / "plots" / "sft.csv").exists()  # it never trained


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="this machine has a GPU")
def test_device_cuda_without_a_gpu_is_a_params_error_naming_the_key(tmp_path):
    result = _stage(_project(tmp_path, device="cuda"), "sft")
    assert result.returncode == 2
    assert _one_line(result).startswith(
        "error: params.yaml: device: 'cuda' was asked for but torch sees no CUDA device"
    )


def test_an_unknown_device_is_refused_with_the_params(tmp_path):
    result = _stage(_project(tmp_path, device="tpu"), "sft")
    assert result.returncode == 2
    assert _one_line(result) == "error: params.yaml: device: 'tpu' is not a device: use auto, cpu, cuda, cuda:N or mps"


@pytest.mark.parametrize("skip", ["0", "1"])
def test_a_truncated_model_file_is_named(tmp_path, skip):
    directory = _project(tmp_path)
    weights = _save_base(directory) / "model.safetensors"
    size = weights.stat().st_size
    weights.write_bytes(weights.read_bytes()[: size // 2])
    result = _stage(directory, "sft", LATENTLAB_SKIP_VERIFY=skip)
    assert result.returncode == 1
    line = _one_line(result)
    if skip == "1":  # no hash: safetensors' own error, with the file named
        assert line.startswith("error: models/base/model.safetensors: the file is damaged (")
    else:
        assert line.startswith("error: models/base does not match the content hash its latentlab.json records")
        assert f"model.safetensors is truncated: {size // 2} of {size} bytes" in line


def test_a_hub_models_layer_count_is_checked_when_the_stage_first_sees_it(tmp_path):
    """A hub model's layer count is unknown to the params schema: the label stage checks it against models/base
    before any work (it used to fail inside the extraction with an IndexError traceback)."""
    label = {**TINY["label"], "layers": [1, 30, -1], "datasets": ["full", "test"]}
    directory = _project(tmp_path, model={"source": "some/hub-model"}, label=label)
    assert _stage(directory, "synth").returncode == 0
    _save_base(directory)  # 2 blocks
    result = _stage(directory, "label")
    assert result.returncode == 2
    assert _one_line(result) == (
        "error: params.yaml: label.layers: layer 30 is out of range for a model with 2 layers "
        "(hidden states 0..2, or -3..-1)"
    )


ACTOR = {**TINY["nla_sft"]["actor"], "layers": [0, 2]}  # the default [0, 2] of a 4-block model


@pytest.mark.parametrize(
    ("name", "model", "params", "message"),
    [
        ("sft", "base", {"sft": {"placeholder_layer": 5}}, "sft.placeholder_layer: layer 5"),
        ("inject", "sft", {"inject": {"gate_layer": 3}}, "inject.gate_layer: layer 3"),
        ("surgery", "sft", {"surgery": {"layers": [-3]}}, "surgery.layers: layer -3"),
        ("nla_sft", "base", {"nla_sft": {**TINY["nla_sft"], "actor": ACTOR}}, "nla_sft.actor.layers: layer 2"),
    ],
)
def test_each_stage_checks_its_layer_keys_against_a_hub_models_layer_count(tmp_path, name, model, params, message):
    """As label does: the stage that reads a layer key names it (exit 2) before any work. On a real checkpoint
    surgery used to train its whole GRPO phase 1 and then fail with an IndexError; sft, inject and nla_sft failed
    later, exit 1, naming no key (`injection layers [0, 2] must be below the number of blocks (2)`)."""
    directory = _project(tmp_path, model={"source": "some/hub-model"}, **params)
    saved = _save_base(directory)  # 2 blocks
    if model != "base":
        shutil.copytree(saved, directory / "models" / model)
    result = _stage(directory, name)
    assert result.returncode == 2, result.stderr
    assert _one_line(result).startswith(f"error: params.yaml: {message} is out of range for a model with 2 layers")
