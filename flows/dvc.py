"""The DVC command line as the flows use it: stage order, streamed commands, param overrides.

Flows drive DVC through its CLI (the same commands a user types), never through torch or stages.
"""

import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ruamel.yaml import YAML

_NODE = re.compile(r'^"([^"]+)";$')
_EDGE = re.compile(r'^"([^"]+)" -> "([^"]+)";$')


class CommandError(RuntimeError):
    """A command exited non-zero; the message carries its last output lines."""


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
    """Run `command`, passing each output line (progress-bar redraws included) to `log` as it comes."""
    process = subprocess.Popen(
        command, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=tool_environment()
    )
    tail: list[str] = []
    pending = b""
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
    if process.wait():
        raise CommandError(f"`{' '.join(command)}` exited with {process.returncode}:\n" + "\n".join(tail))


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
