"""seed_everything pins the thread count: the stages' `threads` param first, then LATENTLAB_THREADS."""

from pathlib import Path

import pytest
import torch

from latentlab.common.runtime import resolve_device, seed_everything

ROOT = Path(__file__).resolve().parents[1]


def test_the_threads_argument_wins_over_the_environment(monkeypatch):
    before = torch.get_num_threads()
    try:
        monkeypatch.setenv("LATENTLAB_THREADS", "2")
        seed_everything(0, 1)
        assert torch.get_num_threads() == 1
        seed_everything(0)  # no argument (the CLI, benchmarks): the environment
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_same_seed_same_draws():
    first = seed_everything(3, 1)
    a = torch.rand(4, generator=first), torch.rand(4)
    second = seed_everything(3, 1)
    b = torch.rand(4, generator=second), torch.rand(4)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


@pytest.mark.parametrize(
    "name, message",
    [
        ("cuda", "'cuda' was asked for but torch sees no CUDA device"),
        ("cuda:1", "'cuda:1' was asked for but torch sees no CUDA device"),
        ("tpu", "'tpu' is not a device torch knows"),
    ],
)
def test_a_device_this_machine_lacks_is_a_value_error_naming_it(monkeypatch, name, message):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match=message):
        resolve_device(name)


def test_a_cuda_index_past_the_gpus_is_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(ValueError, match=r"'cuda:3' was asked for but torch sees 1 CUDA device \(cuda:0\)"):
        resolve_device("cuda:3")


def test_setup_names_the_device_key_and_exits_as_a_params_error(monkeypatch):
    """`device: cuda` on a machine without a GPU: a ParamsError naming `device` (exit 2), not a RuntimeError."""
    from stages.common import setup
    from stages.params import ParamsError, load_params

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    params = load_params(ROOT / "params.yaml").model_copy(update={"device": "cuda"})
    with pytest.raises(ParamsError) as error:
        setup(params)
    assert str(error.value).startswith("params.yaml: device: 'cuda' was asked for but torch sees no CUDA device")
    assert str(error.value).endswith("use device: auto or cpu")
