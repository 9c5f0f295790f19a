"""How the pipeline flow fails: refused params stop it before any stage, a deterministic stage failure is not
retried while a crash is, and params.yaml is given back after a failed or interrupted run.

The project is a real copy of this one (its params schema, its flows), with dvc.yaml swapped for two probe stages
whose behaviour the test chooses ($PROBE), so each failure happens at once and every try is counted.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from tests.dag import make_project
from tests.test_flows import _latest_flow_run, _task_runs, prefect_server

pytestmark = pytest.mark.slow

PROBE = '''"""A probe stage: `python probe.py NAME` does what $PROBE (JSON {name: action}) says; each try is a line of
$PROBE_DIR/NAME.tries (the process id)."""
import json, os, signal, sys, time
from pathlib import Path

name = sys.argv[1]
action = json.loads(os.environ.get("PROBE", "{}")).get(name, "ok")
tries = Path(os.environ["PROBE_DIR"]) / f"{name}.tries"
first = not tries.exists()
with tries.open("a") as log:
    log.write(f"{os.getpid()}\\n")
if action == "exit2":
    print("error: params.yaml: probe refuses its params", file=sys.stderr)
    sys.exit(2)
if action == "killed_once" and first:
    os.kill(os.getpid(), signal.SIGKILL)
if action == "sleep":
    time.sleep(300)
Path("out").mkdir(exist_ok=True)
Path(f"out/{name}.txt").write_text(Path("params.yaml").read_text())  # what follows reruns when params change
'''

DVC_YAML = """stages:
  first:
    cmd: python probe.py first
    params:
      - grpo.even_bonus
    outs:
      - out/first.txt
  second:
    cmd: python probe.py second
    deps:
      - out/first.txt
    outs:
      - out/second.txt
"""


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    project = make_project(tmp_path_factory.mktemp("probe"), tmp_path_factory.mktemp("home"))
    (project.root / "dvc.yaml").write_text(DVC_YAML)
    (project.root / "probe.py").write_text(PROBE)
    scratch = tmp_path_factory.mktemp("tries")
    subprocess.run(["dvc", "repro"], cwd=project.root, env={**project.env, "PROBE_DIR": str(scratch)}, check=True)
    project.run("git", "add", "-A")
    project.run("git", "commit", "-qm", "probe stages, reproduced")
    return project


@pytest.fixture(scope="module")
def api(project, tmp_path_factory):
    with prefect_server(project.env, tmp_path_factory.mktemp("prefect")) as env:
        yield env


@pytest.fixture
def probe(project, api, tmp_path):
    """Runs of `python -m flows.pipeline` in the probe project; what each stage does is the run's `actions`."""

    def flow(*args, actions=None, background=False):
        env = {**api, "PROBE": json.dumps(actions or {}), "PROBE_DIR": str(tmp_path)}
        command = [sys.executable, "-m", "flows.pipeline", *args]
        if background:  # its own session, as a terminal job: a signal can go to the group, as Ctrl-C sends it
            log = (tmp_path / "flow.log").open("w")
            return subprocess.Popen(
                command, cwd=project.root, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        return subprocess.run(command, cwd=project.root, env=env, capture_output=True, text=True, timeout=600)

    yield flow
    for file in tmp_path.glob("*.tries"):  # nothing a probe started outlives its test
        for pid in map(int, file.read_text().split()):
            if psutil.pid_exists(pid):
                os.kill(pid, signal.SIGKILL)
    project.restore()


def tries(probe_dir: Path, stage: str) -> list[int]:
    file = probe_dir / f"{stage}.tries"
    return [int(pid) for pid in file.read_text().split()] if file.exists() else []


def test_an_override_the_schema_refuses_stops_the_flow_before_any_stage(project, api, probe, tmp_path):
    params = (project.root / "params.yaml").read_bytes()
    result = probe("-S", "grpo.clip_eps=1.5")
    assert result.returncode == 2, result.stdout[-3000:] + result.stderr[-3000:]
    assert result.stderr.strip().splitlines()[-1] == (
        "error: params.yaml: grpo.clip_eps: Input should be less than 1 (got 1.5)"
    )
    assert tries(tmp_path, "first") == [] and tries(tmp_path, "second") == []  # nothing ran
    names = [t["name"] for t in _task_runs(api, _latest_flow_run(api)["id"])]
    assert not [n for n in names if n.startswith("dvc repro")], names
    assert (project.root / "params.yaml").read_bytes() == params
    assert project.run("git", "status", "--porcelain").stdout == ""


def test_a_deterministic_failure_is_not_retried_and_a_crash_is(api, probe, tmp_path):
    # first: killed (SIGKILL) on its first try, then fine; second: exits 2 (a params error) every time
    result = probe("--force", "all", actions={"first": "killed_once", "second": "exit2"})
    assert result.returncode != 0
    assert "probe refuses its params" in result.stdout + result.stderr
    assert len(tries(tmp_path, "first")) == 2  # the crash was retried, and the retry passed
    assert len(tries(tmp_path, "second")) == 1  # exit 2: the same inputs fail the same way, no retry
    run = _latest_flow_run(api)
    assert run["state_type"] == "FAILED"
    tasks = {t["name"].removeprefix("dvc repro "): t for t in _task_runs(api, run["id"])}
    assert (tasks["first"]["run_count"], tasks["second"]["run_count"]) == (2, 1)
    assert tasks["first"]["state_type"] == "COMPLETED" and tasks["second"]["state_type"] == "FAILED"


def test_params_yaml_is_given_back_after_a_failed_run(project, probe, tmp_path):
    params = (project.root / "params.yaml").read_bytes()
    result = probe("-S", "grpo.even_bonus=0.25", actions={"second": "exit2"})
    assert result.returncode != 0
    assert (project.root / "params.yaml").read_bytes() == params  # byte for byte: comments and layout too
    assert tries(tmp_path, "first") and tries(tmp_path, "second")  # first ran with the override, second failed


@pytest.mark.parametrize("how", ["ctrl-c", "sigterm"])
def test_params_yaml_is_given_back_after_an_interrupted_run(project, probe, tmp_path, how):
    """Ctrl-C sends SIGINT to the whole terminal job; a cancelled deployment run (or `kill`) gets SIGTERM alone."""
    params = (project.root / "params.yaml").read_bytes()
    running = probe("-S", "grpo.even_bonus=0.3", actions={"first": "sleep"}, background=True)
    try:
        deadline = time.time() + 180
        while not tries(tmp_path, "first"):  # the stage is running (with the override written)
            assert running.poll() is None and time.time() < deadline, (tmp_path / "flow.log").read_text()[-3000:]
            time.sleep(0.2)
        assert b"0.3" in (project.root / "params.yaml").read_bytes()
        if how == "ctrl-c":
            os.killpg(running.pid, signal.SIGINT)
        else:
            running.send_signal(signal.SIGTERM)
        running.wait(timeout=120)
    finally:
        if running.poll() is None:
            os.killpg(running.pid, signal.SIGKILL)
    output = (tmp_path / "flow.log").read_text()
    assert running.returncode != 0, output[-3000:]
    assert (project.root / "params.yaml").read_bytes() == params, output[-3000:]
    # the stage it ran was stopped, not left running (it would finish beside a params.yaml it was not run with)
    stage = tries(tmp_path, "first")[0]
    deadline = time.time() + 30
    while psutil.pid_exists(stage) and psutil.Process(stage).status() != psutil.STATUS_ZOMBIE:
        assert time.time() < deadline, "the interrupted stage is still running"
        time.sleep(0.2)
    assert project.run("git", "status", "--porcelain", "dvc.lock").stdout == ""  # nothing recorded for the override
