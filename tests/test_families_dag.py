"""Every stage of the default DAG on real-family checkpoints (issue 27): Qwen2 (GQA 14/2, qkv bias, tied), Qwen3
(q/k norm; saved sharded), Llama 3 (GQA, untied, no pad) and GPT-2 (fused c_attn), each built by tests/families.py
around its real tokenizer with random weights, and the scratch model as `arch: qwen2`.

The Qwen2 checkpoint runs the whole DAG once through `dvc repro`, as a user does. The other cases run the same
stages in DAG order in one Python process inside the same kind of throwaway project (RUN_IN_ORDER: each stage's
`main`, as `python -m stages.<name>` calls it, on the project's own copy of the code), which saves DVC's and
eleven interpreters' start-up. Sizes are micro (MICRO), and fit the real tokenizers: BPE-tokenized prompts and
grid texts under the families' 256 positions, layer indices of two blocks. Each run's outputs are then checked
(check_outputs): rows, shapes, finite numbers, models that load, the report naming the model.
"""

import json
import math
import sys
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch
from transformers import AutoConfig

from latentlab.hidden.store import open_store
from latentlab.lm.modeling import load_lm
from latentlab.lm.tokenizer import INJECT
from tests.dag import TINY, Project, make_project, stages_in_order
from tests.families import build_family, require_family

pytestmark = pytest.mark.slow

STAGES = stages_in_order()  # each stage after the ones it reads
SCORED = ["base", "sft", "grpo", "inject", "surgery"]


def merged(params: dict, changes: dict) -> dict:
    """`params` with `changes` merged one level down (set_params replaces a nested section whole)."""
    return {k: {**params.get(k, {}), **v} if isinstance(v, dict) else v for k, v in {**params, **changes}.items()}


MICRO = merged(
    TINY,
    {
        "synth": {"operand_max": 9, "n_test": 20},  # 180 training problems
        "grid": {"transitions": 64},
        "sft": {"steps": 8, "lr": 1.0e-2, "warmup_steps": 1},  # Llama 3, GPT-2, scratch: digits, GRPO rewards
        "grpo": {"steps": 2, "eval_every": 2},
        "surgery": {"phases": [1, 2, 2]},
        "nla_sft": {"steps": 3},
        "policy": {"eval": {"envs": 4, "episodes": 4}},
    },
)
QWEN3_SURGERY = {"projections": ["v", "o"]}  # q/k are refused on Qwen3: its per-head q/k norm undoes them

# Each stage's `main` in DAG order, in one process: a failure exits with the stage's one-line error and code.
RUN_IN_ORDER = """
import importlib, sys, latentlab
print("latentlab from", latentlab.__file__, flush=True)
for name in sys.argv[1:]:
    print("stage", name, flush=True)
    importlib.import_module("stages." + name).main()
"""


def family_project(root: Path, name: str, params: dict, **build) -> tuple[Project, str]:
    """A throwaway copy of the project with MICRO params and `model` on the family `name`'s checkpoint
    ("scratch": the scratch model). Returns (project, model source)."""
    source = "scratch" if name == "scratch" else str(build_family(name, root / "checkpoint", **build))
    (root / "project").mkdir()
    project = make_project(root / "project", root / "home")
    project.set_params(merged(MICRO, {**params, "model": {**params.get("model", {}), "source": source}}))
    project.run("git", "commit", "-qam", f"{name} at micro sizes")
    return project, source


def finite(value) -> bool:
    return isinstance(value, int | float) and math.isfinite(value)


def check_outputs(root: Path, model_type: str, source: str) -> None:
    """Each stage's main outputs exist and are sane."""
    synth = {split: pl.read_parquet(root / f"data/synth/{split}.parquet") for split in ("full", "test")}
    grid = pl.read_parquet(root / "data/grid/texts.parquet")
    base, tokenizer = load_lm(root / "models/base")
    hidden, tokens = base.config.hidden_size, MICRO["label"]["tokens"]
    assert base.config.model_type == model_type and INJECT in tokenizer.all_special_tokens
    # label: a row per problem and per grid text, in order; both layers' pooled states, finite
    for name, rows in (*synth.items(), ("grid", grid)):
        labels = pl.read_parquet(root / f"data/labels/{name}.parquet")
        assert labels["id"].to_list() == rows["id"].to_list(), name
        assert labels["n_tokens"].is_between(1, tokens).all() and labels["text_generated"].is_not_null().all()
        pooled = open_store(root / f"data/hidden/{name}.zarr")["pooled"][:]
        assert pooled.shape == (rows.height, 2, hidden) and np.isfinite(pooled).all(), name
    for table, split in (("nla", "full"), ("nla_eval", "test")):
        nla = pl.read_parquet(root / f"data/nla/{table}.parquet")
        assert nla.height == synth[split].height and nla["activation_vector"].dtype.size == hidden
    # the trained models load as the pipeline loads them, same architecture, finite weights; SFT trained
    weights = {"base": dict(base.named_parameters())}
    for name in ("sft", "grpo", "surgery"):
        model, _ = load_lm(root / "models" / name)
        assert model.config.model_type == model_type and model.num_parameters() == base.num_parameters(), name
        weights[name] = dict(model.named_parameters())
        assert all(torch.isfinite(p).all() for p in weights[name].values()), name
    assert any(not torch.equal(p, weights["sft"][k]) for k, p in weights["base"].items())
    for name in ("nla_sft", "nla_rl"):  # (evaluate loaded every actor, critic and the injector to score them)
        critic = AutoConfig.from_pretrained(root / "models" / name / "critic")  # GPT-2 names it n_layer
        assert critic.num_hidden_layers == MICRO["nla_table"]["layer"], name  # cut where the vectors were read
    # metrics: every model scored on every held-out problem, finite numbers (MAE only where an answer parsed)
    scores = json.loads((root / "metrics/eval.json").read_text())
    assert list(scores) == SCORED
    for name, score in scores.items():
        assert score["n"] == synth["test"].height and 0 <= score["accuracy"] <= 1 and finite(score["reward"]), name
        assert finite(score["mae"]) or score["parse_rate"] == 0, name
    nla = json.loads((root / "metrics/nla.json").read_text())
    for name in ("nla_sft", "nla_rl"):
        assert finite(nla[name]["actors"][name]["fve"]) and finite(nla[name]["actors"][name]["cosine"]), name
    policy = json.loads((root / "metrics/policy.json").read_text())
    assert all(finite(agent["return_mean"]) for agent in policy["agents"].values())
    surgery = json.loads((root / "metrics/surgery.json").read_text())
    assert {"sac", "random", "grpo_only"} <= set(surgery)
    assert all(
        finite(row[key])
        for key in ("loss", "reward_mean")
        for row in pl.read_csv(root / "plots/grpo.csv").rows(named=True)
    )
    report = (root / "reports/report.md").read_text()
    assert "| sft |" in report and source in report  # the model its numbers are for


def test_the_whole_dag_runs_on_a_qwen2_checkpoint_through_dvc_repro(tmp_path):
    require_family("qwen2")
    project, source = family_project(tmp_path, "qwen2", {})
    result = project.run("dvc", "repro")
    for stage in STAGES:
        assert f"Running stage '{stage}'" in result.stdout, stage
    check_outputs(project.root, "qwen2", source)
    assert project.status() == {}  # the source stage's standing "always changed" aside


CASES = {  # case -> (family, params over MICRO, build_family options, the model type stages see)
    "qwen3-sharded": ("qwen3", {"surgery": QWEN3_SURGERY}, {"max_shard_size": "4MB"}, "qwen3"),
    "llama3": ("llama3", {}, {}, "llama"),
    "gpt2": ("gpt2", {}, {}, "gpt2"),
    "scratch-qwen2": ("scratch", {"model": {"arch": "qwen2"}}, {}, "qwen2"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_every_stage_runs_in_dag_order_on(case, tmp_path):
    family, params, build, model_type = CASES[case]
    project, source = family_project(tmp_path, family, params, **build)
    if build.get("max_shard_size"):
        assert (Path(source) / "model.safetensors.index.json").exists()
    result = project.run(sys.executable, "-c", RUN_IN_ORDER, *STAGES, timeout=600)
    assert f"latentlab from {project.root / 'latentlab' / '__init__.py'}" in result.stdout  # the project's copy
    assert [line.split()[1] for line in result.stdout.splitlines() if line.startswith("stage ")] == STAGES
    check_outputs(project.root, model_type, source)
