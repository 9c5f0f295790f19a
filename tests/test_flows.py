"""The Prefect flow and its scheduled deployment, against a real `prefect server start` on loopback."""

import contextlib
import json
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from ruamel.yaml import YAML

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def prefect_server(env: dict[str, str], home: Path):
    """A real `prefect server start` on a free loopback port with its state in `home`; yields `env` pointing
    flows and clients at it."""
    port = _free_port()
    env = {
        **env,
        "PREFECT_HOME": str(home),
        "PREFECT_SERVER_UI_ENABLED": "false",
        "PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS": "5",
        "PREFECT_RUNNER_POLL_FREQUENCY": "2",
    }
    log = (home / "server.log").open("w")
    process = subprocess.Popen(
        ["prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    api = f"http://127.0.0.1:{port}/api"
    deadline = time.time() + 90
    while time.time() < deadline:
        try:
            if httpx.get(f"{api}/health", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(0.5)
    else:
        process.kill()
        pytest.fail(f"prefect server did not start: {(home / 'server.log').read_text()[-2000:]}")
    try:
        yield {**env, "PREFECT_API_URL": api}
    finally:
        process.terminate()
        process.wait(timeout=30)


@pytest.fixture(scope="module")
def server(dag, tmp_path_factory):
    """A real Prefect server; yields the environment that points flows and clients at it."""
    with prefect_server(dag.env, tmp_path_factory.mktemp("prefect")) as env:
        yield env


def _post(env, path: str, body: dict) -> list[dict]:
    response = httpx.post(env["PREFECT_API_URL"] + path, json=body, timeout=10)
    response.raise_for_status()
    return response.json()


def _latest_flow_run(env) -> dict:
    return _post(env, "/flow_runs/filter", {"sort": "START_TIME_DESC", "limit": 1})[0]


def _task_runs(env, flow_run_id: str) -> list[dict]:
    return _post(
        env,
        "/task_runs/filter",
        {"flow_runs": {"id": {"any_": [flow_run_id]}}, "sort": "EXPECTED_START_TIME_ASC", "limit": 100},
    )


def _logs(env, flow_run_id: str) -> list[dict]:
    """Every log line of a flow run (the API returns at most 200 a call)."""
    logs: list[dict] = []
    while True:
        page = _post(
            env,
            "/logs/filter",
            {
                "logs": {"flow_run_id": {"any_": [flow_run_id]}},
                "limit": 200,
                "offset": len(logs),
                "sort": "TIMESTAMP_ASC",
            },
        )
        logs += page
        if len(page) < 200:
            return logs


def _flow(dag, env, *args, check=True):
    result = subprocess.run(
        ["python", "-m", "flows.pipeline", *args], cwd=dag.root, env=env, capture_output=True, text=True, timeout=900
    )
    return _checked(result, check)


def _checked(result, check=True):
    if check and result.returncode:
        raise AssertionError(result.stdout[-3000:] + result.stderr[-3000:])
    return result


def test_flow_runs_one_task_per_stage_in_dvc_order(dag, server):
    # as a user without the venv on PATH runs it: `.venv/bin/python -m flows.pipeline` (DVC and the stages'
    # `python` must come from the same venv)
    bare = {**server, "PATH": "/usr/bin:/bin"}
    _checked(
        subprocess.run(
            [sys.executable, "-m", "flows.pipeline", "--force", "report"],
            cwd=dag.root,
            env=bare,
            capture_output=True,
            text=True,
            timeout=900,
        )
    )
    run = _latest_flow_run(server)
    assert run["state_type"] == "COMPLETED"
    names = [t["name"] for t in _task_runs(server, run["id"])]
    stage_tasks = [n for n in names if n.startswith("dvc repro")]
    # one task per stage of dvc.yaml, each after every stage it depends on
    stages = [n.removeprefix("dvc repro ") for n in stage_tasks]
    assert sorted(stages) == sorted(YAML(typ="safe").load((dag.root / "dvc.yaml").read_text())["stages"])
    edges = re.findall(r'"(\w+)" -> "(\w+)"', dag.run("dvc", "dag", "--dot").stdout)
    assert ("sft", "grpo") in edges and ("grpo", "evaluate_arithmetic") in edges
    assert all(stages.index(before) < stages.index(after) for before, after in edges)
    assert names[-1] == "publish artifacts"
    # the forced stage ran and its output was streamed into the Prefect logs
    messages = "\n".join(entry["message"] for entry in _logs(server, run["id"]))
    assert "Running stage 'report'" in messages and "Stage 'grpo' didn't change, skipping" in messages


def test_flow_publishes_metrics_and_report_artifacts(dag, server):
    table = _post(
        server,
        "/artifacts/filter",
        {"artifacts": {"key": {"any_": ["latentlab-metrics"]}}, "sort": "CREATED_DESC", "limit": 1},
    )[0]
    rows = json.loads(table["data"]) if isinstance(table["data"], str) else table["data"]
    assert [row["model"] for row in rows][:3] == ["base", "sft", "grpo"]
    assert all("accuracy_even" in row for row in rows)
    report = _post(
        server,
        "/artifacts/filter",
        {"artifacts": {"key": {"any_": ["latentlab-report"]}}, "sort": "CREATED_DESC", "limit": 1},
    )[0]
    assert report["type"] == "markdown" and "# latentlab report" in report["data"]


def test_flow_experiment_with_overrides_then_push(dag, server, tmp_path):
    remote = tmp_path / "remote"
    dag.run("dvc", "remote", "add", "--local", "-d", "storage", str(remote))
    try:
        _flow(dag, server, "--set", "grpo.even_bonus=0.3", "--name", "flowexp", "--push")
        experiments = dag.run("dvc", "exp", "show", "--json").stdout
        assert "flowexp" in experiments
        names = [t["name"] for t in _task_runs(server, _latest_flow_run(server)["id"])]
        assert names[0] == "set params" and "dvc exp save flowexp" in names and names[-1] == "dvc push"
        assert any(remote.rglob("*")), "dvc push sent nothing to the remote"
    finally:
        dag.run("dvc", "remote", "remove", "--local", "storage")
        dag.restore()


def test_independent_stages_run_side_by_side_with_the_same_results(dag, server):
    # grpo, inject and surgery (all after sft) rerun, and what follows; a value no other test sets, so DVC's run
    # cache (filled by the experiment test's 0.3) cannot restore them instead of running them
    dag.set_params({"grpo": {"even_bonus": 0.35}})
    try:
        _flow(dag, server, "--jobs", "2")
        run = _latest_flow_run(server)
        assert run["state_type"] == "COMPLETED"
        tasks = {t["name"].removeprefix("dvc repro "): t for t in _task_runs(server, run["id"])}
        rerun = ["grpo", "inject", "surgery"]
        spans = sorted((tasks[s]["start_time"], tasks[s]["end_time"]) for s in rerun)
        assert any(later[0] < earlier[1] for earlier, later in zip(spans, spans[1:])), f"none overlapped: {spans}"
        for before, after in re.findall(r'"(\w+)" -> "(\w+)"', dag.run("dvc", "dag", "--dot").stdout):
            assert tasks[before]["end_time"] <= tasks[after]["start_time"], (before, after)
        assert dag.status() == {}  # both stages' results recorded in dvc.lock
        lock = (dag.root / "dvc.lock").read_text()
        for stage in rerun[:2]:  # one after another, as `dvc repro` runs them: the same outputs
            dag.run("dvc", "repro", "--force", "--single-item", stage)
        assert (dag.root / "dvc.lock").read_text() == lock
    finally:
        dag.restore()


def test_a_stage_refusing_its_params_fails_the_flow_without_retries(dag, server):
    # invalid: every stage checks the whole params.yaml, so `source` (always run first) exits 2, every time
    dag.set_params({"grpo": {"clip_eps": 5.0}})
    try:
        result = _flow(dag, server, "--jobs", "2", check=False)
        assert result.returncode != 0
        run = _latest_flow_run(server)
        assert run["state_type"] == "FAILED"
        tasks = {t["name"].removeprefix("dvc repro "): t for t in _task_runs(server, run["id"])}
        assert tasks["source"]["run_count"] == 1  # exit 2 is deterministic: a retry would fail the same way
        assert "grpo.clip_eps" in result.stdout + result.stderr
        # after the first failure nothing new starts: what needs the failed stages never ran
        assert (
            not any(t.startswith("evaluate") for t in tasks)
            and "report" not in tasks
            and "publish artifacts" not in tasks
        )
    finally:
        dag.restore()


def test_an_unknown_override_fails_before_any_stage_runs(dag, server):
    result = _flow(dag, server, "--set", "grpo.evn_bonus=1", check=False)
    assert result.returncode != 0 and "grpo.evn_bonus" in result.stdout + result.stderr
    assert dag.run("git", "status", "--porcelain", "params.yaml").stdout == ""


def test_the_deployment_is_served_on_a_cron_schedule_and_runs(dag, server, tmp_path):
    log = (tmp_path / "serve.log").open("w")
    serving = subprocess.Popen(
        ["python", "-m", "flows.deploy", "--name", "ci", "--cron", "* * * * *"],
        cwd=dag.root,
        env=server,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.time() + 60
        while not (deployments := _post(server, "/deployments/filter", {"sort": "NAME_ASC", "limit": 10})):
            assert time.time() < deadline and serving.poll() is None, (tmp_path / "serve.log").read_text()
            time.sleep(1)
        deployment = deployments[0]
        assert deployment["name"] == "ci"
        assert [s["schedule"]["cron"] for s in deployment["schedules"]] == ["* * * * *"]
        deadline = time.time() + 180  # the next minute boundary, the runner's poll, the run itself
        while True:
            runs = _post(
                server,
                "/flow_runs/filter",
                {"deployments": {"id": {"any_": [deployment["id"]]}}, "sort": "EXPECTED_START_TIME_ASC", "limit": 10},
            )
            if any(r["state_type"] == "COMPLETED" for r in runs):
                break
            assert not any(r["state_type"] in ("FAILED", "CRASHED") for r in runs), runs
            assert time.time() < deadline, (tmp_path / "serve.log").read_text()[-3000:]
            time.sleep(2)
        completed = next(r for r in runs if r["state_type"] == "COMPLETED")
        assert completed["parameters"]["repo"] == str(dag.root.resolve())
        assert completed["auto_scheduled"] is True  # started by the schedule, not by hand
    finally:
        serving.terminate()
        serving.wait(timeout=30)


def test_a_missing_dvc_stops_the_flow_at_once_with_a_clear_message(monkeypatch, tmp_path):
    from flows.dvc import CommandError, require_dvc

    monkeypatch.setattr(sys, "executable", str(tmp_path / "python"))
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(CommandError, match="dvc was not found beside .*python nor on PATH"):
        require_dvc()
