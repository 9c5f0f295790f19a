"""The DVC command line as the flows use it: stage order, streamed commands, param overrides.

Flows drive DVC through its CLI (the same commands a user types), never through torch or stages.
"""

import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ruamel.yaml import YAML

_NODE = re.compile(r'^"([^"]+)";$')
_EDGE = re.compile(r'^"([^"]+)" -> "([^"]+)";$')
_STAGE_EXIT = re.compile(r"failed to run: .*, exited with (-?\d+)$")  # DVC's line when a stage's command fails

PARAMS_ERROR = 2  # a stage's exit code when params.yaml refuses it (stages/common.py): the same inputs fail again


class CommandError(RuntimeError):
    """A command exited non-zero; the message carries its last output lines.

    stage_exit: the exit code of the stage command DVC ran, when that is what failed (DVC exits 255 for any
    failure, and names the stage's code in its last line); None otherwise.
    """

    def __init__(self, message: str, stage_exit: int | None = None):
        super().__init__(message)
        self.stage_exit = stage_exit


class ParamsRefused(ValueError):
    """Param overrides that params.yaml's schema refuses: the message is the schema's, naming the key."""


_running: set[subprocess.Popen] = set()  # the commands run_streaming started that have not ended
_running_lock = threading.Lock()
_stopping = threading.Event()  # stop_commands was called: nothing new starts


def tool_environment() -> dict[str, str]:
    """The environment for DVC and the stages it runs: this interpreter's directory first on PATH, so
    `.venv/bin/python -m flows.pipeline` runs the `dvc` and the `python -m stages.X` of the same venv."""
    here = str(Path(sys.executable).parent)
    return {**os.environ, "PATH": here + os.pathsep + os.environ.get("PATH", "")}


def require_dvc() -> str:
    """The `dvc` executable the flows will run; a missing one stops the flow at once, saying so."""
    found = shutil.which("dvc", path=tool_environment()["PATH"])
    if found is None:
        raise CommandError(
            f"dvc was not found beside {sys.executable} nor on PATH: install the project (make setup) and run "
            "the flow with its interpreter, e.g. .venv/bin/python -m flows.pipeline"
        )
    return found


def run_streaming(command: list[str], cwd: str | Path, log: Callable[[str], None]) -> None:
    """Run `command`, passing each output line (progress-bar redraws included) to `log` as it comes.

    Interrupted in this thread (Ctrl-C, Prefect's SIGTERM), it stops the command before it lets go: a `dvc repro`
    left running would record its stage in dvc.lock against whatever params.yaml holds by then.
    """
    with _running_lock:
        if _stopping.is_set():
            raise CommandError(f"`{' '.join(command)}` not started: the flow is stopping")
        process = subprocess.Popen(
            command,
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=tool_environment(),
        )
        _running.add(process)
    tail: list[str] = []
    pending = b""
    try:
        while chunk := process.stdout.read1(65536):
            pending += chunk
            *lines, pending = re.split(rb"[\r\n]", pending)
            for line in lines:
                if text := line.decode(errors="replace").strip():
                    log(text)
                    tail = (tail + [text])[-20:]
        if text := pending.decode(errors="replace").strip():
            log(text)
            tail.append(text)
        process.wait()
    except BaseException:
        _stop([process])
        raise
    finally:
        with _running_lock:
            _running.discard(process)
        process.stdout.close()
    if process.returncode:
        stage_exit = next((int(m.group(1)) for line in reversed(tail) if (m := _STAGE_EXIT.search(line))), None)
        message = f"`{' '.join(command)}` exited with {process.returncode}:\n" + "\n".join(tail)
        raise CommandError(message, stage_exit)


def allow_commands() -> None:
    """A flow starts: commands may run again in this process (after an earlier flow's `stop_commands`)."""
    _stopping.clear()


def stopping() -> bool:
    """True once `stop_commands` was called (a retry would start what the flow is stopping)."""
    return _stopping.is_set()


def stop_commands(grace: float = 20.0) -> None:
    """Stop every command `run_streaming` started that still runs, and start no new one (a flow that failed or was
    interrupted, with stages running in its worker threads). See `_stop`."""
    _stopping.set()
    with _running_lock:
        running = list(_running)
    _stop(running, grace)


def _stop(processes: list[subprocess.Popen], grace: float = 20.0) -> None:
    """The processes each command started (the stage under `dvc repro`) get SIGTERM, so DVC sees its stage fail and
    records nothing; then DVC has `grace` seconds to exit before it and what is left of its tree are killed."""
    import psutil  # a dependency of DVC's

    def tree(process: subprocess.Popen) -> list[psutil.Process]:
        try:
            return psutil.Process(process.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return []

    def signal_all(found: list[psutil.Process], kill: bool) -> None:
        for child in found:
            try:
                child.kill() if kill else child.terminate()
            except psutil.NoSuchProcess:
                pass

    for process in processes:
        signal_all(tree(process), kill=False)
    deadline = time.monotonic() + grace
    for process in processes:
        try:
            process.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            signal_all(tree(process), kill=True)
            process.kill()
            process.wait()


def stage_graph(cwd: str | Path) -> dict[str, set[str]]:
    """Every stage of dvc.yaml (in dvc.yaml order) and the stages it depends on, from `dvc dag --dot`."""
    dot = subprocess.run(
        [require_dvc(), "dag", "--dot"], cwd=cwd, check=True, capture_output=True, text=True, env=tool_environment()
    ).stdout
    parents: dict[str, set[str]] = {}
    for line in dot.splitlines():
        if match := _EDGE.match(line.strip()):
            parents[match.group(2)].add(match.group(1))
        elif match := _NODE.match(line.strip()):
            parents[match.group(1)] = set()
    return parents


def stage_order(parents: dict[str, set[str]]) -> list[str]:
    """The stages in an order DVC can run them one by one: topologically sorted, ties in dvc.yaml order."""
    order: list[str] = []
    while len(order) < len(parents):
        ready = [n for n in parents if n not in order and parents[n] <= set(order)]
        if not ready:
            raise RuntimeError(f"dvc dag has a cycle among {set(parents) - set(order)}")
        order.append(ready[0])
    return order


def apply_param_overrides(params_file: str | Path, overrides: dict[str, Any]) -> None:
    """Set dotted keys (`grpo.even_bonus`) in params.yaml like `dvc exp run -S`, keeping comments.

    Only existing keys can be set, so a typo fails here, naming the key, before anything runs.
    """
    yaml = YAML()  # round-trip mode: comments and key order survive
    path = Path(params_file)
    data = yaml.load(path.read_text())
    for dotted, value in overrides.items():
        node, leaf = param_node(data, dotted, path)
        node[leaf] = value
    with path.open("w") as handle:
        yaml.dump(data, handle)


def param_node(data: dict, dotted: str, path: str | Path) -> tuple[dict, str]:
    """The section holding the existing key `dotted` (`grpo.even_bonus` -> (data["grpo"], "even_bonus"));
    a KeyError naming the key when params `path` has no such key."""
    *parents, leaf = dotted.split(".")
    node = data
    for key in parents:
        if not isinstance(node, dict) or key not in node:
            raise KeyError(f"{path}: no section {key!r} for override {dotted!r}")
        node = node[key]
    if not isinstance(node, dict) or leaf not in node:
        raise KeyError(f"{path}: no key {dotted!r} to override")
    return node, leaf


def check_param_overrides(repo: str | Path, overrides: dict[str, Any]) -> None:
    """Refuse `overrides` the params schema refuses, before anything runs: a copy of params.yaml with them applied
    is checked by `python -m stages.params --check` in a subprocess (the schema imports the library, hence torch,
    which the flows never import). Raises ParamsRefused with the schema's message, which names the key."""
    with tempfile.TemporaryDirectory(prefix="latentlab-params-") as scratch:
        copy = Path(scratch) / "params.yaml"
        shutil.copyfile(Path(repo) / "params.yaml", copy)
        try:
            apply_param_overrides(copy, overrides)
        except KeyError as error:
            raise ParamsRefused(str(error.args[0]).replace(str(copy), "params.yaml")) from None
        check = subprocess.run(
            [sys.executable, "-m", "stages.params", "--check", str(copy)],
            cwd=repo,
            capture_output=True,
            text=True,
            env=tool_environment(),
        )
    message = (check.stderr.strip() or check.stdout.strip()).replace(str(copy), "params.yaml")
    if check.returncode == PARAMS_ERROR:
        raise ParamsRefused(message.removeprefix("error: "))
    if check.returncode:
        raise CommandError(f"`python -m stages.params --check` exited with {check.returncode}:\n{message[-3000:]}")
