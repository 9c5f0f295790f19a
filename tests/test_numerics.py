"""Portable numerics: the CPU kernels pinned to AVX2 before torch loads, so a stage's bytes do not depend on the
CPU or on the parent environment (latentlab/common/numerics.py)."""

import hashlib
import os
import subprocess
import sys

import pytest

from latentlab.common import numerics
from tests.dag import make_project

PINNED = numerics._PINNED


@pytest.fixture
def environ(monkeypatch):
    """A private copy of the environment for `pin` to edit (the test process's own stays as it is)."""
    copy = {k: v for k, v in os.environ.items() if k not in numerics.PORTABLE_ENV and k != PINNED}
    monkeypatch.setattr(os, "environ", copy)
    return copy


def test_portable_overrides_the_parent_environment(environ):
    environ["ATEN_CPU_CAPABILITY"] = "avx512"
    numerics.pin("portable")
    for name, value in numerics.PORTABLE_ENV.items():
        assert environ[name] == value, name
    assert environ["LATENTLAB_NUMERICS"] == "portable"
    assert "ATEN_CPU_CAPABILITY" in environ[PINNED].split(",")


def test_native_removes_only_what_pin_set(environ):
    environ["MKL_CBWR"] = "AVX2"  # the user's own setting, equal to the pin: not ours to remove
    numerics.pin("portable")
    assert "MKL_CBWR" not in environ[PINNED].split(",")
    numerics.pin("native")
    assert environ["MKL_CBWR"] == "AVX2"
    assert "ATEN_CPU_CAPABILITY" not in environ and PINNED not in environ
    assert environ["LATENTLAB_NUMERICS"] == "native"


def test_a_child_of_a_pinned_process_can_still_run_native(environ):
    """A stage with `numerics: native` started by a portable process (pytest, a flow) drops the inherited pins."""
    numerics.pin("portable")
    inherited = dict(environ)
    environ.clear()
    environ.update(inherited)
    numerics.pin("native")
    assert not set(numerics.PORTABLE_ENV) & set(environ)


def test_an_unknown_mode_is_refused(environ):
    with pytest.raises(ValueError, match="numerics"):
        numerics.pin("fast")


def test_importing_latentlab_first_pins_torch():
    code = "import latentlab, torch; torch.ones(2).exp(); print(torch.backends.cpu.get_cpu_capability())"
    env = {k: v for k, v in os.environ.items() if k not in numerics.PORTABLE_ENV and k != PINNED}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() in ("AVX2", "DEFAULT")  # DEFAULT: a CPU without AVX2 (then nothing is portable)


def _machine_best() -> str:
    env = {k: v for k, v in os.environ.items() if k not in numerics.PORTABLE_ENV and k != PINNED}
    code = "import torch; print(torch.backends.cpu.get_cpu_capability())"
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True).stdout.strip()


@pytest.mark.slow
def test_a_stage_gives_the_same_bytes_whatever_capability_the_parent_chose(tmp_path):
    """`python -m stages.base` under a parent environment that asks for AVX-512 and one that asks for AVX2: the
    same model bytes under portable numerics. The control: under native numerics the two differ (on a machine
    with AVX-512; elsewhere the control cannot be made and is skipped), so the comparison can fail."""
    project = make_project(tmp_path / "project", tmp_path / "home")
    project.set_params({"base": {"steps": 12, "grid_share": 0.0}})
    user_env = {k: v for k, v in project.env.items() if k not in numerics.PORTABLE_ENV and k != PINNED}
    project.run(sys.executable, "-m", "stages.synth")

    def model_bytes(mode: str, capability: str) -> str:
        project.set_params({"numerics": mode})
        project.env = {**user_env, "ATEN_CPU_CAPABILITY": capability}
        project.run(sys.executable, "-m", "stages.base")
        return hashlib.sha256((project.root / "models/base/model.safetensors").read_bytes()).hexdigest()

    best = "avx512" if _machine_best() == "AVX512" else "default"
    assert model_bytes("portable", best) == model_bytes("portable", "avx2")
    if best != "avx512":
        pytest.skip("this CPU has no AVX-512: native and portable kernels are the same here")
    assert model_bytes("native", "avx512") != model_bytes("native", "avx2")
