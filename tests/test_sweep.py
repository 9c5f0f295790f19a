"""Sweeps: the interval math by hand, the plan and the claims file, and a real sweep on a Prefect work pool."""

import hashlib
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from ruamel.yaml import YAML

from flows.claims import CLAIMS, update_claims
from flows.stats import summarize, t_interval, t_quantile, t_two_sided_probability
from flows.sweep import parse_grid, parse_stage_seeds, plan, uncommitted
from latentlab.figures import claims_markdown
from tests.test_flows import _post, server  # noqa: F401  (the module-scoped Prefect server fixture)

SCRATCH = YAML(typ="safe").load((Path(__file__).parents[1] / "params.yaml").read_text())["model"]


@pytest.mark.parametrize(
    ("df", "expected"),  # Student t 97.5% quantiles from printed tables
    [(1, 12.706), (2, 4.303), (3, 3.182), (4, 2.776), (9, 2.262), (29, 2.045), (120, 1.980)],
)
def test_t_quantile_matches_the_table(df, expected):
    assert t_quantile(0.975, df) == pytest.approx(expected, abs=5e-4)


def test_t_cdf_closed_forms():
    # df=1 is Cauchy: P(|T| <= 1) = 2 atan(1) / pi = 1/2; df=2: P(|T| <= t) = t / sqrt(t^2 + 2)
    assert t_two_sided_probability(1.0, 1) == pytest.approx(0.5)
    assert t_two_sided_probability(3.0, 2) == pytest.approx(3 / math.sqrt(11))
    assert t_quantile(0.995, 1) == pytest.approx(63.657, abs=1e-3)
    assert t_quantile(0.975, 10_000) == pytest.approx(1.960, abs=1e-3)  # tends to the normal quantile


def test_summary_by_hand():
    # [1, 2, 3]: mean 2, s = 1; Student's half width t(0.975, 2) * 1 / sqrt(3) = 4.3027 / 1.7321 = 2.4841
    assert t_interval([1.0, 2.0, 3.0]) == pytest.approx((2 - 2.48414, 2 + 2.48414), abs=1e-5)
    # the rows' bootstrap: 3 seeds put a tail of 1 - Phi(sqrt(3/2) 4.303) ~ 1e-7 a side: the whole range [1, 3]
    s = summarize([1.0, 2.0, 3.0])
    assert (s["n"], s["mean"], s["std"], s["low"], s["high"]) == (3, 2.0, 1.0, 1.0, 3.0)
    assert summarize([0.25])["low"] is None  # no interval from 1


def test_grid_plan_names_and_order():
    grid = parse_grid(["grpo.even_bonus=0,0.1", "label.layers=[1,-1],[2]"])
    assert grid == {"grpo.even_bonus": ["0", "0.1"], "label.layers": ["[1,-1]", "[2]"]}
    experiments = plan(grid, [0, 1], ["evaluate"])
    assert len(experiments) == 8 and len({e.name for e in experiments}) == 8
    # configuration-major: runs side by side have different seeds
    assert [e.seed for e in experiments[:2]] == [0, 1] and experiments[0].config == experiments[1].config
    assert experiments[0].overrides == ["grpo.even_bonus=0", "label.layers=[1,-1]", "seed=0"]
    # a name depends on everything that defines the run, and only on that
    assert plan(grid, [0, 1], ["evaluate"])[3].name == experiments[3].name
    assert plan(grid, [0, 1], ["grpo"])[3].name != experiments[3].name


def test_the_two_units_of_variation_plan_names_and_overrides():
    from flows.sweep import Experiment

    # whole-pipeline seeds: a name hashes what it did before stage seeds existed, so those experiments are reused
    legacy = Experiment((("grpo.even_bonus", "0.1"),), 2, ("evaluate_arithmetic",))
    digest = hashlib.sha256(json.dumps([legacy.config, 2, ["evaluate_arithmetic"]]).encode()).hexdigest()[:6]
    assert legacy.name == f"even_bonus0.1-s2-{digest}" and legacy.unit == "seed"
    # stage seeds: grpo and inject share each value (paired), on each fixed top-level seed
    stages, own = parse_stage_seeds("grpo,inject=3")
    assert (stages, own) == (["grpo", "inject"], [0, 1, 2])
    experiments = plan({"grpo.even_bonus": ["0.1"]}, [0, 1], ["evaluate_arithmetic"], stages, own)
    assert [(e.seed, e.stage_seed) for e in experiments] == [(0, 0), (1, 0), (0, 1), (1, 1), (0, 2), (1, 2)]
    assert experiments[3].overrides == [
        "grpo.even_bonus=0.1",
        "seed=1",
        "stage_seeds.grpo=1",
        "stage_seeds.inject=1",
    ]
    assert experiments[3].name.startswith("even_bonus0.1-s1-d1-") and experiments[3].unit == "stage_seeds.grpo,inject"
    assert len({e.name for e in experiments}) == 6
    # the stage seed and the stages seeded are part of what defines a run
    assert experiments[0].name != Experiment(legacy.config, 0, ("evaluate_arithmetic",)).name
    other = plan({"grpo.even_bonus": ["0.1"]}, [0, 1], ["evaluate_arithmetic"], ["grpo"], own)
    assert other[0].name != experiments[0].name


@pytest.mark.parametrize(
    ("text", "message"),
    [("grpo", "STAGE"), ("grpo=0", "N >= 1"), ("=5", "STAGE"), ("sft,grpo=5", r"\['sft'\] have no seed")],
)
def test_stage_seeds_option_names_what_is_wrong(text, message):
    with pytest.raises(SystemExit, match=message):
        parse_stage_seeds(text)


def test_a_sweep_refuses_stage_seeds_through_set_and_claims_from_too_few_seeds():
    from flows.sweep import check_keys, sweep

    root = str(Path(__file__).parents[1])
    with pytest.raises(SystemExit, match="--stage-seeds"):
        check_keys(root, {"stage_seeds.grpo": ["1", "2"]})
    with pytest.raises(SystemExit, match="at least 5 seeds per arm, this sweep has 3 \\(--seeds\\)"):
        sweep.fn(repo=root, seeds=[0, 1, 2], claims=["even_recovery"])
    with pytest.raises(SystemExit, match="this sweep has 4 \\(--stage-seeds\\)"):
        sweep.fn(
            repo=root, seeds=[0, 1, 2, 3, 4, 5], claims=["even_recovery"], stages=["grpo"], stage_seeds=[0, 1, 2, 3]
        )


def test_stage_seeded_rows_are_per_fixed_seed_over_the_stages_own_seeds(monkeypatch):
    from flows import sweep_results

    stages, own = parse_stage_seeds("grpo,inject=5")
    experiments = plan({}, [0, 1], ["evaluate_arithmetic"], stages, own)
    # sft depends on the top-level seed alone (it is upstream); grpo on both
    files = {
        e.name: {
            "metrics/eval.json": {
                "sft": {"accuracy_even": 0.01 * e.seed},
                "grpo": {"accuracy_even": 0.2 + 0.1 * e.seed + 0.01 * e.stage_seed},
            }
        }
        for e in experiments
    }
    monkeypatch.setattr(sweep_results, "experiment_files", lambda repo: files)
    monkeypatch.setattr(sweep_results, "stages_run", lambda repo, targets: None)
    monkeypatch.setattr(sweep_results, "metric_owners", lambda repo, paths: {})
    status = {e.name: {"status": "ran"} for e in experiments}
    summary = sweep_results.summarize_sweep(".", "abcdef0", experiments, status, "c", 1.0)
    assert summary["unit"] == "stage_seeds.grpo,inject" and summary["stage_seeds"] == [0, 1, 2, 3, 4]
    gain = [r for r in summary["rows"] if r["metric"] == "grpo.accuracy_even - sft.accuracy_even"]
    assert [(r["config"], r["seeds"], r["unit"]) for r in gain] == [
        ({"seed": "0"}, [0, 1, 2, 3, 4], "stage_seeds.grpo,inject"),
        ({"seed": "1"}, [0, 1, 2, 3, 4], "stage_seeds.grpo,inject"),
    ]
    # seed 1: 0.3 + 0.01 d - 0.01, paired per stage seed: 0.29 .. 0.33, its interval within that range
    assert gain[1]["values"] == pytest.approx([0.29, 0.30, 0.31, 0.32, 0.33])
    assert 0.29 <= gain[1]["low"] < gain[1]["high"] <= 0.33
    sft = [r for r in summary["rows"] if r["metric"] == "sft.accuracy_even"]
    assert [r["std"] for r in sft] == [0.0, 0.0]  # the fixed SFT model: no variation over the stage seeds
    assert "Unit of variation: `stage_seeds.grpo,inject`" in sweep_results.markdown("t", summary)


def test_only_results_may_be_uncommitted_when_a_sweep_starts(tmp_path):
    def git(*args):
        subprocess.run(["git", *args], cwd=tmp_path, check=True, capture_output=True)

    git("init", "-q")
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "claims.json").write_text("{}")
    (tmp_path / "params.yaml").write_text("seed: 0\n")
    git("add", ".")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "start")
    (tmp_path / "results" / "claims.json").write_text('{"claims": {}}')  # the previous sweep's output
    (tmp_path / "notes.txt").write_text("untracked")
    assert uncommitted(tmp_path) == ""
    (tmp_path / "params.yaml").write_text("seed: 1\n")  # an edit the experiments would not see
    assert uncommitted(tmp_path) == "M params.yaml"


def test_the_injection_table_has_a_row_per_configuration_with_its_interval(tmp_path):
    from flows.claims import INJECT, INJECTION_METRICS
    from stages.report import injection_section

    def row(config, metric, values):
        return {"config": config, "metric": metric, **summarize(values), "seeds": [0, 1, 2], "experiments": ["e"] * 3}

    variants = [
        row({"inject.variant": v}, m, [base + 0.1 * i for i in range(3)])
        for v, base in (("residual", 0.0), ("gated", 0.4))
        for m in INJECTION_METRICS
    ]
    shuffled = [row({"inject.shuffle_hidden": "true"}, f"{INJECT}final.accuracy", [0.2, 0.2, 0.2])]
    path = tmp_path / "claims.json"
    summary = {"command": "c", "baseline": "abcdef0", "keys": [], "seeds": [0, 1, 2], "targets": ["inject"]}
    summary |= {"interval": "t", "counts": {"total": 3, "ran": 3, "reused": 0, "failed": 0}}
    update_claims(path, ["inject_variants"], {**summary, "rows": variants}, SCRATCH)
    claims = update_claims(path, ["inject_shuffled"], {**summary, "rows": shuffled}, SCRATCH)

    table = injection_section(claims)
    lines = {line.split(" | ")[0]: line for line in table.splitlines() if line.startswith("| ")}
    assert "| inject: variant=gated" in lines and "| inject: shuffle_hidden=true" in lines
    # mean 0.5 of 0.4, 0.5, 0.6 with its bootstrap interval (3 seeds: their whole range)
    assert "0.500 [0.400, 0.600]" in lines["| inject: variant=gated"]
    assert "0.200" in lines["| inject: shuffle_hidden=true"]
    sft = lines["| SFT model (frozen, no injection)"].split(" | ")
    assert sft[1] == sft[3] == "0.100 [0.000, 0.200]"  # its step 0 is its accuracy: nothing trains
    assert sft[2] == "–"  # no alignment phase


def test_a_claim_whose_metrics_no_experiment_reports_is_refused(tmp_path):
    row = {"config": {}, "metric": "grpo.accuracy", **summarize([0.5, 0.6]), "seeds": [0, 1], "experiments": ["a", "b"]}
    summary = {"command": "c", "baseline": "abcdef0", "keys": [], "seeds": [0, 1], "targets": [], "interval": "t"}
    summary |= {"counts": {"total": 2, "ran": 2, "reused": 0, "failed": 0}, "rows": [row]}
    with pytest.raises(KeyError, match="inject_variants"):
        update_claims(tmp_path / "claims.json", ["inject_variants"], summary, SCRATCH)
    assert not (tmp_path / "claims.json").exists()


def test_claims_file_rewrites_its_own_entries_and_keeps_the_others(tmp_path):
    path = tmp_path / "claims.json"
    path.write_text(json.dumps({"claims": {"later_stage": {"title": "kept", "rows": []}}}))
    row = {"config": {"grpo.even_bonus": "0.1"}, "n": 2, "mean": 0.5, "std": 0.1, "low": 0.4, "high": 0.6}
    rows = [{**row, "metric": m, "seeds": [0, 1], "experiments": ["a", "b"]} for m in ("grpo.accuracy", "x.y")]
    sweep = {"command": "c", "baseline": "abcdef0", "keys": [], "seeds": [0, 1], "targets": [], "interval": "t"}
    update_claims(path, ["inject_vs_grpo"], {**sweep, "counts": {"total": 2, "failed": 0}, "rows": rows}, SCRATCH)
    claims = json.loads(path.read_text())["claims"]
    assert claims["later_stage"]["title"] == "kept"
    assert [r["metric"] for r in claims["inject_vs_grpo"]["rows"]] == ["grpo.accuracy"]  # only the claim's metrics
    text = claims_markdown({"claims": {"inject_vs_grpo": claims["inject_vs_grpo"]}})
    assert CLAIMS["inject_vs_grpo"]["title"] in text and "[0.400, 0.600]" in text and "a, b" in text
    assert "no claims yet" in claims_markdown({"claims": {}})


def test_claims_name_their_model_and_a_report_of_another_model_leaves_them_out(tmp_path, monkeypatch):
    """The issue's report: a run on another model printed the scratch model's committed claims under its heading."""
    from flows.claims import claims_of_another_model
    from stages import report

    row = {
        "config": {},
        "n": 2,
        "mean": 0.5,
        "std": 0.1,
        "low": 0.4,
        "high": 0.6,
        "seeds": [0, 1],
        "experiments": ["a"],
    }
    sweep = {"command": "c", "baseline": "abcdef0", "keys": [], "seeds": [0, 1], "targets": [], "interval": "t"}
    path = tmp_path / "claims.json"
    path.write_text(json.dumps({"claims": {"earlier": {"title": "swept before claims named a model", "rows": []}}}))
    qwen = {"source": "/models/qwen2.5-0.5b", "revision": None}
    summary = {**sweep, "counts": {"total": 2, "failed": 0}, "rows": [{**row, "metric": "grpo.accuracy"}]}
    claims = update_claims(path, ["inject_vs_grpo"], summary, qwen)
    assert claims["claims"]["inject_vs_grpo"]["model"] == qwen
    # an entry without a model is the default scratch model's (every claim before models were recorded)
    assert claims_of_another_model(claims, SCRATCH) == ["inject_vs_grpo"]
    assert claims_of_another_model(claims, qwen) == ["earlier"]
    assert claims_of_another_model(claims, {**SCRATCH, "hidden_size": 128}) == ["earlier", "inject_vs_grpo"]
    # full fine-tuning (adapter none) is the model the claims were swept on; LoRA training is another
    lora = {"rank": 8, "alpha": 16.0, "dropout": 0.0, "target_modules": None}
    assert claims_of_another_model(claims, {**SCRATCH, "adapter": "none", "lora": lora}) == ["inject_vs_grpo"]
    assert claims_of_another_model(claims, {**SCRATCH, "adapter": "lora", "lora": lora}) == [
        "earlier",
        "inject_vs_grpo",
    ]
    # float32 weights (the default) are the model the claims were swept on; bfloat16 weights are another
    assert claims_of_another_model(claims, {**SCRATCH, "dtype": "float32"}) == ["inject_vs_grpo"]
    assert claims_of_another_model(claims, {**SCRATCH, "dtype": "bfloat16"}) == ["earlier", "inject_vs_grpo"]

    monkeypatch.setattr(report, "CLAIMS", path)
    kept, note = report.this_models_claims(SCRATCH)
    assert list(kept["claims"]) == ["earlier"] and "`inject_vs_grpo`" in note
    kept, note = report.this_models_claims(qwen)
    assert list(kept["claims"]) == ["inject_vs_grpo"] and "`earlier`" in note
    assert CLAIMS["inject_vs_grpo"]["title"] in report.claims_section(kept, qwen)
    assert "No claims of this model" in report.claims_section({"claims": {}}, qwen)


@pytest.mark.slow
def test_a_sweep_on_a_work_pool_with_two_workers(dag, server, tmp_path):  # noqa: F811
    env = {**server, "LATENTLAB_THREADS": "1"}
    subprocess.run(["prefect", "work-pool", "create", "latentlab", "--type", "process"], env=env, check=True)
    workers = [
        subprocess.Popen(
            ["prefect", "worker", "start", "--pool", "latentlab", "--type", "process", "--limit", "1"],
            cwd=dag.root,
            env=env,
            stdout=(tmp_path / f"worker{i}.log").open("w"),
            stderr=subprocess.STDOUT,
        )
        for i in range(2)
    ]

    def sweep(values: str):
        command = ["python", "-m", "flows.sweep", "-S", f"grpo.even_bonus={values}", "--seeds", "2"]
        result = subprocess.run(
            [*command, "--targets", "grpo", "--name", "t"], cwd=dag.root, env=env, capture_output=True, text=True
        )
        summary = json.loads((dag.root / "results/sweeps/t/summary.json").read_text())
        return result, summary

    try:
        # 2 values x 2 seeds, plus a value the grpo stage rejects (even_bonus must be >= 0)
        result, summary = sweep("0.1,0.3,-1")
        assert result.returncode == 1, result.stdout[-3000:] + result.stderr[-3000:]
        assert "running on work pool 'latentlab'" in result.stdout
        assert summary["counts"] == {"total": 6, "ran": 4, "reused": 0, "failed": 2}
        failed = [r for r in summary["experiments"] if r["status"] == "failed"]
        assert {r["config"]["grpo.even_bonus"] for r in failed} == {"-1"}
        assert all("grpo.even_bonus" in r["error"] for r in failed)
        ok = [r["name"] for r in summary["experiments"] if r["status"] == "ran"]
        # every run is a DVC experiment, with its DVCLive metrics and plots
        assert set(dag.run("dvc", "exp", "list", "--name-only").stdout.split()) >= set(ok)
        dag.run("dvc", "plots", "diff", ok[0], ok[-1], "--json", "-o", str(tmp_path / "plots"))
        # each configuration is summarised over its two seeds, naming them
        reward = [r for r in summary["rows"] if r["metric"] == "dvclive/grpo/metrics.json:reward_mean"]
        assert [(r["config"]["grpo.even_bonus"], r["n"], r["seeds"]) for r in reward] == [
            ("0.1", 2, [0, 1]),
            ("0.3", 2, [0, 1]),
        ]
        assert all(r["low"] <= r["mean"] <= r["high"] for r in reward)
        # the flow runs: one per experiment on the pool, failed ones retried once, both workers used
        runs = _post(env, "/flow_runs/filter", {"work_pools": {"name": {"any_": ["latentlab"]}}})
        assert sorted(r["state_type"] for r in runs) == ["COMPLETED"] * 4 + ["FAILED"] * 2
        assert all(r["run_count"] == 2 for r in runs if r["state_type"] == "FAILED")
        assert all("submitting flow run" in (tmp_path / f"worker{i}.log").read_text() for i in range(2))
        assert (dag.root / "results/sweeps/t/grpo.even_bonus.png").stat().st_size > 0

        # the same experiments again: found by name, nothing recomputed, no new flow run
        started = time.time()
        result, summary = sweep("0.1,0.3")
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        assert summary["counts"] == {"total": 4, "ran": 0, "reused": 4, "failed": 0}
        assert len(_post(env, "/flow_runs/filter", {"work_pools": {"name": {"any_": ["latentlab"]}}})) == 6
        assert time.time() - started < 120
    finally:
        for worker in workers:
            worker.terminate()
            worker.wait(timeout=30)
        dag.run("git", "clean", "-q", "-d", "--force", "results")


STEP = '''"""A stage of the little sweep project: `python step.py NAME` (first -> second; other beside them)."""
import json, os, sys, time
from pathlib import Path
from ruamel.yaml import YAML

name, params = sys.argv[1], YAML(typ="safe").load(Path("params.yaml").read_text())
Path("metrics").mkdir(exist_ok=True)
if name == "first":
    Path("data").mkdir(exist_ok=True)
    Path("data/first.txt").write_text(str(10 * params["a"] + params["seed"]))
    value = 10 * params["a"] + params["seed"]
elif name == "second":
    if params["sleep"]:  # a long experiment: its process id in $PROBE_DIR/second.tries, then it sleeps
        with (Path(os.environ["PROBE_DIR"]) / "second.tries").open("a") as log:
            log.write(f"{os.getpid()}\\n")
        time.sleep(params["sleep"])
    value = int(Path("data/first.txt").read_text()) + 1
else:
    value = 111
Path(f"metrics/{name}.json").write_text(json.dumps({"value": value}))
'''

LITTLE_DVC_YAML = """stages:
  first:
    cmd: python step.py first
    params: [seed, a]
    outs: [data/first.txt]
    metrics:
      - metrics/first.json:
          cache: false
  second:
    cmd: python step.py second
    deps: [data/first.txt]
    params: [sleep]
    metrics:
      - metrics/second.json:
          cache: false
  other:
    cmd: python step.py other
    params: [a]
    metrics:
      - metrics/other.json:
          cache: false
"""


@pytest.fixture(scope="module")
def little(tmp_path_factory):
    """A small git + DVC project, reproduced and committed, and a real Prefect server: sweeps of it take seconds."""
    from tests.dag import ROOT, environment
    from tests.test_flows import prefect_server

    root, home = tmp_path_factory.mktemp("little"), tmp_path_factory.mktemp("home")
    env = environment(home)
    (root / "params.yaml").write_text("seed: 0\na: 1\nsleep: 0\n")
    (root / "dvc.yaml").write_text(LITTLE_DVC_YAML)
    (root / "step.py").write_text(STEP)
    for command in (["git", "init", "-q", "-b", "main"], ["dvc", "init", "-q"], ["dvc", "repro"], ["git", "add", "-A"]):
        subprocess.run(command, cwd=root, env=env, check=True, capture_output=True)
    subprocess.run(["git", "commit", "-qm", "little"], cwd=root, env=env, check=True, capture_output=True)
    with prefect_server(env, tmp_path_factory.mktemp("prefect")) as env:

        def sweep(*args, probe_dir=None, background=False):
            """`python -m flows.sweep --repo <little> --local --seeds 1 ...` (from this checkout)."""
            command = [sys.executable, "-m", "flows.sweep", "--repo", str(root), "--local", "--seeds", "1", *args]
            run_env = {**env, "PROBE_DIR": str(probe_dir or home)}
            if background:  # its own session: the test can kill it with everything it started
                log = (Path(probe_dir) / f"sweep-{time.time_ns()}.log").open("w")
                return subprocess.Popen(
                    command, cwd=ROOT, env=run_env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
                )
            return subprocess.run(command, cwd=ROOT, env=run_env, capture_output=True, text=True, timeout=600)

        yield root, sweep


@pytest.mark.slow
def test_the_summary_leaves_out_metrics_of_stages_the_sweep_did_not_run(little):
    root, sweep = little
    result = sweep("-S", "a=2,3", "--targets", "second", "--name", "marks")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    summary = json.loads((root / "results/sweeps/marks/summary.json").read_text())
    # first and second ran (second is the target, first feeds it): their numbers are this sweep's results
    means = {(r["config"]["a"], r["metric"]): r["mean"] for r in summary["rows"]}
    assert means == {
        ("2", "metrics/first.json:value"): 20,
        ("2", "metrics/second.json:value"): 21,
        ("3", "metrics/first.json:value"): 30,
        ("3", "metrics/second.json:value"): 31,
    }
    # other never ran: its metrics file holds the baseline's number (111), which no setting of the sweep produced
    assert summary["not_run"] == {"metrics/other.json": "other"}
    text = (root / "results/sweeps/marks/sweep.md").read_text()
    assert "`metrics/other.json` (stage `other`)" in text


def _clones(root: Path, prefix: str) -> list[Path]:
    """The sweep's clones of experiments whose name starts with `prefix`, wherever under .dvc/tmp/sweep."""
    return [p for p in (root / ".dvc/tmp/sweep").rglob(f"{prefix}*") if (p / ".git").exists()]


@pytest.mark.slow
def test_clones_of_a_killed_sweep_are_removed_and_a_running_sweeps_are_kept(little, tmp_path):
    root, sweep = little
    killed = sweep("-S", "sleep=300", "--targets", "second", "--name", "killed", probe_dir=tmp_path, background=True)
    running = sweep("-S", "sleep=301", "--targets", "second", "--name", "running", probe_dir=tmp_path, background=True)
    try:
        deadline = time.time() + 240
        while len(_stage_pids(tmp_path)) < 2:  # both experiments are in their long stage
            assert killed.poll() is None and running.poll() is None and time.time() < deadline, _logs(tmp_path)
            time.sleep(0.5)
        assert _clones(root, "sleep300") and _clones(root, "sleep301")
        os.killpg(killed.pid, signal.SIGKILL)  # kill -9 of the sweep and all it started: its clone stays behind
        killed.wait(timeout=30)
        assert _clones(root, "sleep300")

        result = sweep("-S", "a=4", "--targets", "second", "--name", "after")
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        assert _clones(root, "sleep300") == []  # its owner is dead: removed when the next sweep started
        assert _clones(root, "sleep301"), "a running sweep's clone was removed"
        assert _clones(root, "a4") == []  # the sweep that ended took its own clone with it

        running.send_signal(signal.SIGTERM)  # a sweep that fails (here: is stopped) removes its clones too
        running.wait(timeout=120)
        assert _clones(root, "sleep301") == []
        assert not [p for p in _stage_pids(tmp_path) if _alive(p)], "a stopped sweep left its stage running"
    finally:
        for process in (killed, running):
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
        for pid in _stage_pids(tmp_path):
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)


def _stage_pids(probe_dir: Path) -> list[int]:
    file = probe_dir / "second.tries"
    return [int(pid) for pid in file.read_text().split()] if file.exists() else []


def _alive(pid: int) -> bool:
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _logs(probe_dir: Path) -> str:
    return "\n".join(log.read_text()[-2000:] for log in probe_dir.glob("sweep-*.log"))
