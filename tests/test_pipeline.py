"""End to end: the real `dvc repro`, experiments, push/pull and failure handling on a tiny DAG.

Every test uses the session's `dag` project (reproduced once) and leaves it as it found it.
"""

import json
import os
import signal
import subprocess
import time

import polars as pl
import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.dag import stages_in_order

pytestmark = pytest.mark.slow
STAGES = stages_in_order(skip=())  # every stage of dvc.yaml


def _lock_hash(project, stage: str, path: str) -> str:
    from ruamel.yaml import YAML

    lock = YAML(typ="safe").load((project.root / "dvc.lock").read_text())
    return next(out["md5"] for out in lock["stages"][stage]["outs"] if out["path"] == path)


def test_repro_runs_every_stage_and_writes_every_output(dag):
    for stage in STAGES:
        assert f"Running stage '{stage}'" in dag.first_repro.stdout
    root = dag.root
    for split in ("biased", "full", "test"):
        table = pl.read_parquet(root / f"data/synth/{split}.parquet")
        assert table.columns == ["id", "prompt", "answer", "y", "parity", "a", "b", "op"]
    for name in ("base", "sft", "grpo"):
        model = AutoModelForCausalLM.from_pretrained(root / "models" / name)
        tokenizer = AutoTokenizer.from_pretrained(root / "models" / name)
        assert model.config.vocab_size == len(tokenizer)
    metrics = json.loads((root / "metrics/eval.json").read_text())
    assert list(metrics) == ["base", "sft", "grpo", "inject", "surgery"]
    for scores in metrics.values():
        assert {"accuracy", "accuracy_odd", "accuracy_even", "mae", "reward"} <= set(scores)
    report = (root / "reports/report.md").read_text()
    assert "| sft |" in report and "![training curves](training.png)" in report
    # the report names its model; the committed claims (the default 4-layer model's) are not printed under it
    assert "for the scratch llama model built by `base` (2 layers, hidden 32, 4 heads" in report
    assert "were swept on another model than this run's and are not shown here" in report
    surgery = json.loads((root / "metrics/surgery.json").read_text())
    assert {"sac", "random", "grpo_only"} <= set(surgery) and surgery["grpo_only"]["commits"] == 0
    assert "## Attention surgery" in report and (root / "reports/surgery.png").stat().st_size > 1000
    returns = json.loads((root / "metrics/policy.json").read_text())  # the grid returns table, from evaluate_grid
    assert set(returns["agents"]) == {"hidden", "obs", "behaviour", "random"}
    assert "## Grid world" in report and "| hidden |" in report
    assert (root / "reports/training.png").stat().st_size > 1000
    grpo_log = pl.read_csv(root / "plots/grpo.csv")
    assert {"reward_mean", "reward_std", "zero_std_groups", "kl", "clip_fraction", "loss"} <= set(grpo_log.columns)
    assert grpo_log.height == 4
    # wall-clock columns live apart, so the main log is the same for the same seed
    speed = pl.read_csv(root / "plots/grpo_speed.csv")
    assert set(speed.columns) == {"step", "tokens_per_s", "seconds_per_step"} and "tokens_per_s" not in grpo_log.columns


def test_every_claim_names_metrics_the_dag_writes(dag):
    """A claim's metric that no stage writes would leave its row out of the report without a word."""
    from flows.claims import CLAIMS, CONDITIONAL_METRICS
    from flows.sweep_results import named_metrics

    files = {str(p.relative_to(dag.root)): json.loads(p.read_text()) for p in (dag.root / "metrics").glob("*.json")}
    written = named_metrics(files)
    assert not CONDITIONAL_METRICS & set(written)  # the default run has no alignment phase
    for claim_id, claim in CLAIMS.items():
        assert [m for m in claim["metrics"] if m not in written and m not in CONDITIONAL_METRICS] == [], claim_id


def test_repro_with_nothing_changed_runs_nothing(dag):
    started = time.perf_counter()
    result = dag.run("dvc", "repro")
    # `source` alone runs (always_changed: it looks at model.source again) and finds nothing new
    assert [line for line in result.stdout.splitlines() if line.startswith("Running stage")] == [
        "Running stage 'source':"
    ]
    assert "didn't change, skipping" in result.stdout and "Stage 'base' didn't change" in result.stdout
    assert time.perf_counter() - started < 30


def test_a_param_change_reruns_only_what_depends_on_it(dag):
    dag.set_params({"grpo_full": {"lr": 2e-4}})
    try:
        assert set(dag.status()) == {"grpo"}  # evaluate/report change only once grpo's output does
        result = dag.run("dvc", "repro", "grpo")
        assert "Running stage 'grpo'" in result.stdout
        for upstream in ("synth", "base", "sft"):
            assert f"Running stage '{upstream}'" not in result.stdout
    finally:
        dag.restore()
    assert dag.status() == {}


def test_a_stage_seed_reruns_its_stage_on_the_same_upstream_models(dag):
    """stage_seeds.grpo is grpo's param alone: grpo reruns, then what reads its model; synth, base and sft (the
    fixed models the seed is varied on) and inject (a sibling reading sft) stay as they are."""
    dag.set_params({"stage_seeds": {"grpo": 1}})
    try:
        assert set(dag.status()) == {"grpo"}
        dag.run("dvc", "repro", "--single-item", "grpo")
        stale = set(dag.status())
        assert "evaluate_arithmetic" in stale and not {"synth", "base", "sft", "inject", "grpo"} & stale, stale
    finally:
        dag.restore()


def test_artifacts_carry_what_their_readers_need(dag):
    """The NLA table says which layer it holds (nla_sft's critic is cut there), models/nla_rl how it was trained
    (evaluate_nla reports that algo): nothing downstream reads the upstream stage's params."""
    from latentlab.hidden.nla_table import nla_table_info
    from latentlab.lm.modeling import read_manifest

    info = nla_table_info(dag.root / "data/nla/nla.parquet")
    assert info.layer == 1 and info.store == "data/hidden/full.zarr" and info.pooling == "mean"
    critic = json.loads((dag.root / "models/nla_sft/critic/nla_critic.json").read_text())
    assert critic["critic"]["layer"] == info.layer
    manifest = read_manifest(dag.root / "models/nla_rl/actor")
    assert (manifest["algo"], manifest["max_new_tokens"]) == ("grpo", 8)
    assert json.loads((dag.root / "metrics/nla.json").read_text())["algo"] == manifest["algo"]


def test_retraining_nla_rl_reruns_its_evaluation_and_no_other(dag):
    dag.set_params({"nla_rl": {"reward": "exp"}})  # another reward: another actor
    try:
        assert set(dag.status()) == {"nla_rl"}
        dag.run("dvc", "repro", "--single-item", "nla_rl")
        stale = set(dag.status())
        assert "evaluate_nla" in stale and not {"evaluate_arithmetic", "evaluate_grid"} & stale, stale
    finally:
        dag.restore()


def test_same_seed_same_outputs(dag):
    before = _lock_hash(dag, "grpo", "models/grpo")
    dag.run("dvc", "repro", "--force", "--single-item", "grpo")
    assert _lock_hash(dag, "grpo", "models/grpo") == before
    assert dag.status() == {}
    assert dag.run("git", "status", "--porcelain").stdout == ""  # dvc.lock unchanged: timings are not hashed


def test_experiment_with_a_param_override(dag, tmp_path):
    baseline = _lock_hash(dag, "grpo", "models/grpo")
    baseline_metrics = (dag.root / "metrics/eval.json").read_bytes()
    dag.run("dvc", "exp", "run", "-S", "grpo.even_bonus=0.5", "--name", "bonus05")
    try:
        assert _lock_hash(dag, "grpo", "models/grpo") != baseline  # the override reached training
        rows = json.loads(dag.run("dvc", "exp", "show", "--json").stdout)
        workspace_params = json.dumps(rows)
        assert "bonus05" in workspace_params
        diff = json.loads(dag.run("dvc", "params", "diff", "main", "--json").stdout)
        assert diff["params.yaml"]["grpo.even_bonus"]["new"] == 0.5
        # --all: the tiny models may answer the same despite new weights; the table must still be there
        metrics_diff = dag.run("dvc", "metrics", "diff", "main", "--all").stdout
        assert "metrics/eval.json" in metrics_diff and "grpo.reward" in metrics_diff
        plots = dag.run("dvc", "plots", "show", "-o", str(tmp_path / "plots_html")).stdout
        assert (tmp_path / "plots_html" / "index.html").exists(), plots
        # back to the baseline with the README's command: params and lock from git, outputs from the cache
        dag.run("git", "checkout", "HEAD", "--", "params.yaml", "dvc.lock")
        dag.run("dvc", "checkout")
        assert _lock_hash(dag, "grpo", "models/grpo") == baseline
        assert (dag.root / "metrics/eval.json").read_bytes() == baseline_metrics
        assert dag.status() == {}
        assert dag.run("git", "status", "--porcelain").stdout == ""
    finally:
        dag.restore()


def test_push_then_pull_into_a_fresh_clone(dag, tmp_path):
    remote = tmp_path / "remote"
    dag.run("dvc", "remote", "add", "--local", "-d", "storage", str(remote))
    try:
        dag.run("dvc", "push")
        clone = tmp_path / "clone"
        dag.run("git", "clone", "-q", str(dag.root), str(clone))
        dag.run("dvc", "remote", "add", "--local", "-d", "storage", str(remote), cwd=clone)
        dag.run("dvc", "pull", cwd=clone)
        assert dag.status(cwd=clone) == {}
        for path in ("models/grpo/model.safetensors", "data/synth/test.parquet", "metrics/eval.json"):
            assert (clone / path).read_bytes() == (dag.root / path).read_bytes()
    finally:
        dag.run("dvc", "remote", "remove", "--local", "storage")


def test_a_stage_killed_half_way_leaves_nothing_valid(dag):
    dag.set_params({"sft": {"steps": 3000}})  # long enough to be killed while training
    process = subprocess.Popen(
        ["dvc", "repro", "--single-item", "sft"],
        cwd=dag.root,
        env=dag.env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        output = b""
        while b"sft:" not in output:  # the progress bar: training has started
            chunk = process.stdout.read1(4096)
            assert chunk, output.decode()[-2000:]
            output += chunk
        time.sleep(1.0)
        os.killpg(process.pid, signal.SIGKILL)  # dvc and the stage's python process under it
        process.wait(timeout=30)
        assert not (dag.root / "models/sft").exists()  # DVC removed the old output, nothing new was moved in
        assert "sft" in dag.status()
    finally:
        dag.run("git", "checkout", "HEAD", "--", "params.yaml")
    # DVC reruns sft or, as its params are back to the committed ones, restores the output from its cache
    dag.run("dvc", "repro")
    assert (dag.root / "models/sft/model.safetensors").is_file()
    assert dag.status() == {}
    assert not list((dag.root / "models").glob(".sft.partial-*"))
    assert dag.run("git", "status", "--porcelain").stdout == ""  # same outputs as before: dvc.lock unchanged


def test_base_from_a_local_hugging_face_directory(dag, tmp_path):
    source = tmp_path / "local-model"
    import shutil

    shutil.copytree(dag.root / "models/sft", source)  # any HF causal-LM directory
    dag.set_params({"model": {"source": str(source)}})
    try:
        result = dag.run("dvc", "repro", "base")
        assert "Running stage 'base'" in result.stdout
        manifest = json.loads((dag.root / "models/base/latentlab.json").read_text())
        assert manifest["source"] == str(source)
        assert (dag.root / "models/base/model.safetensors").read_bytes() == (source / "model.safetensors").read_bytes()
        assert "Stage 'base' didn't change" in dag.run("dvc", "repro", "base").stdout  # the same files: nothing new
        # new weights in the same directory (the issue: replacing them reran nothing) rerun base
        shutil.copytree(dag.root / "models/grpo", source, dirs_exist_ok=True)
        result = dag.run("dvc", "repro", "base")
        assert "Running stage 'base'" in result.stdout
        assert (dag.root / "models/base/model.safetensors").read_bytes() == (source / "model.safetensors").read_bytes()
    finally:
        dag.restore()


def test_make_baseline_takes_heads_outputs_from_the_cache_or_rebuilds_them(dag, tmp_path):
    """`make baseline` after an experiment: params and lock from git, outputs from the cache. In a fresh clone
    where HEAD's outputs were never produced (no cache, no remote), it rebuilds them with `dvc repro` and, under
    portable numerics, gets HEAD's dvc.lock byte for byte (the README's old `git checkout ... && dvc checkout`
    exited 255 there and left the outputs missing)."""
    make = ["make", "-o", "setup", "-o", ".venv/.installed", "baseline"]  # the test's venv, not a new one
    dag.set_params({"grpo": {"even_bonus": 0.5}})
    try:
        out = dag.run(*make).stdout
        assert "checked out from the DVC cache" in out
        assert dag.run("git", "status", "--porcelain").stdout == ""
        assert dag.status() == {}
    finally:
        dag.restore()

    clone = tmp_path / "clone"
    dag.run("git", "clone", "-q", str(dag.root), str(clone))
    out = dag.run(*make, cwd=clone, timeout=1800).stdout
    assert "rebuilding them with dvc repro" in out and "rebuilt, byte for byte as dvc.lock pins" in out, out
    assert dag.run("git", "status", "--porcelain", cwd=clone).stdout == ""
    for path in ("models/grpo/model.safetensors", "metrics/eval.json", "data/nla/nla.parquet"):
        assert (clone / path).read_bytes() == (dag.root / path).read_bytes(), path
