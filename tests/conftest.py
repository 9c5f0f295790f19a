import os

import pytest

# Tests never log to W&B and never touch the user's Prefect state.
os.environ["WANDB_MODE"] = "disabled"


@pytest.fixture(scope="session")
def tiny_lm():
    """A small random Llama with the project's character tokenizer: (model, tokenizer)."""
    import torch

    from latentlab.modeling import TinyLMConfig, build_tiny_lm
    from latentlab.tokenizer import build_char_tokenizer

    torch.manual_seed(0)
    tokenizer = build_char_tokenizer()
    model = build_tiny_lm(TinyLMConfig(hidden_size=32, layers=2, heads=4, intermediate_size=64, max_positions=64),
                          tokenizer).eval()
    return model, tokenizer


@pytest.fixture(scope="session")
def dag(tmp_path_factory):
    """The real DAG reproduced once (`dvc repro`) in a throwaway repo; tests that change it restore it."""
    from tests.dag import make_project

    project = make_project(tmp_path_factory.mktemp("project"), tmp_path_factory.mktemp("home"))
    project.first_repro = project.run("dvc", "repro")
    project.run("git", "add", "-A")
    project.run("git", "commit", "-qm", "reproduced")
    return project
