"""dvc.yaml must declare what each stage really reads, or `dvc repro` silently skips a stage whose code changed."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest
from ruamel.yaml import YAML

from stages.code_deps import code_deps, generated, imported_project_files

ROOT = Path(__file__).resolve().parents[1]
STAGES = YAML(typ="safe").load((ROOT / "dvc.yaml").read_text())["stages"]


@pytest.mark.parametrize("name", sorted(STAGES))
def test_every_imported_project_file_is_a_dependency(name):
    stage = STAGES[name]
    script = ROOT / (stage["cmd"].split()[-1].replace(".", "/") + ".py")
    deps = set(stage["deps"])
    assert str(script.relative_to(ROOT)) in deps
    # The packages' __init__.py files hold no code of their own that changes an output (the OpenMP wait policy;
    # the kernel pins live in latentlab/common/numerics.py, which they import); everything else is a dep.
    wanted = {file for file in imported_project_files(script) if not file.endswith("__init__.py")}
    assert sorted(wanted - deps) == []
    assert [d for d in stage["deps"] if d.endswith(".py")] == code_deps(stage)  # and nothing it does not run


def test_dvc_yaml_code_deps_are_in_sync_with_the_generator():
    """`make dvc-deps` writes them; the check mode fails (exit 1, naming the stages) on a file out of date."""
    text = (ROOT / "dvc.yaml").read_text()
    assert generated(text) == (text, [])
    check = [sys.executable, "-m", "stages.code_deps", "--check", "--dvc-yaml"]
    assert subprocess.run([*check, str(ROOT / "dvc.yaml")], cwd=ROOT).returncode == 0


def test_the_generator_restores_a_dropped_dep_and_keeps_the_rest(tmp_path):
    text = (ROOT / "dvc.yaml").read_text()
    stale = text.replace("      - stages/paths.py\n", "", 1).replace("      - latentlab/common/atomic.py\n", "", 1)
    assert stale != text
    path = tmp_path / "dvc.yaml"
    path.write_text(stale)
    check = subprocess.run(
        [sys.executable, "-m", "stages.code_deps", "--check", "--dvc-yaml", str(path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert check.returncode == 1 and "synth" in check.stdout and "make dvc-deps" in check.stdout
    written = subprocess.run([sys.executable, "-m", "stages.code_deps", "--dvc-yaml", str(path)], cwd=ROOT)
    assert written.returncode == 0 and path.read_text() == text  # comments, data deps and order as they were


# Sections every stage may read: how and where the run happens, not what any stage produced.
RUN_WIDE = {"seed", "stage_seeds", "device", "threads", "numerics", "launcher", "gpu", "prompt", "model", "wandb"}
# A stage's own section: its name, or the part before `_` for the split evaluation (evaluate_nla: evaluate).
# Beyond those, the settings a stage is configured with that live in a shared section, each with why. A fact
# about an artifact never comes from here: it travels with the artifact (a store's attributes, the NLA table's
# metadata, a model's manifest), so e.g. nla_sft never reads `label` or `nla_table`, evaluate_nla never `nla_rl`.
SHARED_SETTINGS = {
    "grpo": {"evaluate": "its monitor's generation length"},
    "inject": {"grpo": "the shared GRPO core it trains with", "evaluate": "its monitor's batch and length"},
    "surgery": {"grpo": "the shared GRPO core it trains with", "evaluate": "its held-out harness"},
    "policy": {"grid": "the environment's action set and image the policy acts in"},
    "evaluate_arithmetic": {"grpo": "grpo.even_bonus: the task reward the scores are reported under"},
    "evaluate_grid": {"grid": "the environment played", "policy": "policy.eval: the online evaluation protocol"},
    "report": {
        "grpo": "the configuration line the report prints (params.yaml of this run, which dvc.lock ties to it)",
        "inject": "the same, for the injector",
        "surgery": "the same, for surgery",
    },
}


def _sections(params: list) -> set[str]:
    return {str(key).split(".")[0] for key in params}


def _own(name: str) -> set[str]:
    return {name, name.split("_")[0]} if name.startswith("evaluate_") else {name, f"{name}_full"}


@pytest.mark.parametrize("name", sorted(STAGES))
def test_no_stage_reads_another_stages_params_to_learn_about_an_artifact(name):
    declared = _sections(STAGES[name].get("params", []))
    foreign = declared - _own(name) - RUN_WIDE
    assert foreign == set(SHARED_SETTINGS.get(name, {})), f"{name} reads {sorted(foreign)} of other stages"


@pytest.mark.parametrize("name", sorted(STAGES))
def test_a_stage_reads_only_the_params_dvc_yaml_declares(name):
    """Every `params.<section>` the stage's script reads is declared in dvc.yaml (so the allowlist above is
    the whole story, not just what dvc.yaml admits to)."""
    source = ROOT / f"stages/{name}.py"
    read = {
        node.attr
        for node in ast.walk(ast.parse(source.read_text()))
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "params"
    }
    read -= {"model_dump", "layer_problem"}  # methods of the whole Params
    assert read <= _sections(STAGES[name].get("params", [])), f"{name} reads undeclared {sorted(read)}"


@pytest.mark.parametrize("name, own", [("grpo", "grpo_full"), ("inject", "inject")])
def test_grpo_stages_track_the_shared_section_and_their_own_learning_rate(name, own):
    """The shared `grpo` section holds no learning rate; each GRPO stage tracks it whole plus its own section."""
    params = YAML(typ="safe").load((ROOT / "params.yaml").read_text())
    assert "lr" not in params["grpo"] and "lr" in params[own]
    assert {"grpo", own} <= set(STAGES[name]["params"])


# stages/common.py's `setup` reads these: the seed, the device, the thread count (a result's last bits), the
# launcher's shards (the sampling streams) and gpu.precision (autocast); a stage that calls it depends on all five
SETUP_PARAMS = {"seed", "device", "threads", "numerics", "launcher", "gpu"}


@pytest.mark.parametrize("name", sorted(STAGES))
def test_stages_that_call_setup_track_what_it_reads(name):
    source = (ROOT / "stages" / f"{name}.py").read_text()
    params = STAGES[name].get("params", [])
    if "setup(params)" in source:
        assert SETUP_PARAMS <= set(params), f"{name}: dvc.yaml params lack {sorted(SETUP_PARAMS - set(params))}"
    assert len(params) == len(set(map(str, params))), f"{name}: a param is listed twice"


def test_each_stage_seed_is_tracked_by_its_own_stage_alone():
    """`stage_seeds.<stage>` replaces `seed` in that stage only (Params.for_stage), so only that stage may list it:
    changing it reruns the stage and what reads its outputs, and never an upstream stage (whose cached outputs, the
    fixed base and SFT models, are the point of seeding one stage)."""
    from stages.params import StageSeeds

    listed = {
        name: [str(p) for p in spec.get("params", []) if str(p).startswith("stage_seeds")]
        for name, spec in STAGES.items()
    }
    assert {name: keys for name, keys in listed.items() if keys} == {
        name: [f"stage_seeds.{name}"] for name in StageSeeds.model_fields
    }
    assert all("seed" in STAGES[name]["params"] for name in StageSeeds.model_fields)  # null: the top-level seed
