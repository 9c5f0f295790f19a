"""seed_everything pins the thread count: the stages' `threads` param first, then LATENTLAB_THREADS."""

import torch

from latentlab.common.runtime import seed_everything


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
