import latentlab  # noqa: F401  (first: the CPU kernels pinned before torch loads, as every stage pins them)

# isort: split
import os

import pytest

# Tests never log to W&B and never touch the user's Prefect state.
os.environ["WANDB_MODE"] = "disabled"
os.environ["HF_HUB_OFFLINE"] = "1"  # nothing is downloaded: a hub id that is not here fails at once
# One torch thread per test process unless the caller says otherwise: a thread count changes float results in the
# last bits, and tests compare a run in this process with one in a subprocess (the stage, a killed-and-resumed
# run, torchrun ranks); both read this. Two xdist workers x 1 thread also fit the 2 cores CI has.
os.environ.setdefault("LATENTLAB_THREADS", "1")


@pytest.fixture(scope="session")
def tiny_lm():
    """tests/tiny.py's model, shared read-only by the session: (model, tokenizer). Tests that train build their own."""
    from tests.tiny import new_tiny_lm

    return new_tiny_lm()


@pytest.fixture(scope="session")
def dag(tmp_path_factory):
    """The real DAG reproduced once (`dvc repro`) in a throwaway repo; tests that change it restore it."""
    from tests.dag import make_project

    project = make_project(tmp_path_factory.mktemp("project"), tmp_path_factory.mktemp("home"))
    project.first_repro = project.run("dvc", "repro")
    project.run("git", "add", "-A")
    project.run("git", "commit", "-qm", "reproduced")
    return project
