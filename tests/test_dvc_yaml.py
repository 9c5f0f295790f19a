"""dvc.yaml must declare what each stage really reads, or `dvc repro` silently skips a stage whose code changed."""

import ast
from pathlib import Path

import pytest
from ruamel.yaml import YAML

ROOT = Path(__file__).resolve().parents[1]
STAGES = YAML(typ="safe").load((ROOT / "dvc.yaml").read_text())["stages"]


# The params schema imports every config class, but what a stage reads from it are values, which dvc.yaml tracks
# as params (and test_params checks params.yaml spells out every key); its imports are not code the stage runs.
SCHEMA = "stages/params.py"


def _imported_project_files(path: Path) -> set[str]:
    """Every latentlab/ and stages/ file the script runs, imported directly or through others (function-level too)."""
    seen: set[str] = set()
    pending = [path, ROOT / "stages/__init__.py"]  # `python -m stages.x` runs the package's __init__ first
    while pending:
        tree = ast.parse(pending.pop().read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
            elif isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            else:
                continue
            for name in names:
                if not name.startswith(("latentlab", "stages")):
                    continue
                file = ROOT / (name.replace(".", "/") + ".py")
                if not file.is_file():  # a package: its __init__.py
                    file = ROOT / name.replace(".", "/") / "__init__.py"
                relative = str(file.relative_to(ROOT))
                if file.is_file() and relative not in seen and relative != SCHEMA:
                    seen.add(relative)
                    pending.append(file)
    return seen


@pytest.mark.parametrize("name", sorted(STAGES))
def test_every_imported_project_file_is_a_dependency(name):
    stage = STAGES[name]
    script = ROOT / (stage["cmd"].split()[-1].replace(".", "/") + ".py")
    deps = set(stage["deps"])
    assert str(script.relative_to(ROOT)) in deps
    # The packages' __init__.py files hold no code of their own that changes an output (the OpenMP wait policy;
    # the kernel pins live in latentlab/common/numerics.py, which they import); everything else is a dep.
    wanted = {file for file in _imported_project_files(script) if not file.endswith("__init__.py")}
    assert sorted(wanted - deps) == []


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
