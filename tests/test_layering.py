"""The library's architecture as a test: imports go one way between its packages and never form a cycle.

    common < lm < hidden, policies < rl          tasks beside them (above policies, not rl)
    cli.py and figures.py at the top; nothing in latentlab/ imports stages/ or flows/

Imports inside functions count: a late import is still a dependency (and still reruns what it feeds).
"""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LIBRARY = ROOT / "latentlab"

# what each package may import besides itself
ALLOWED = {
    "common": set(),
    "lm": {"common"},
    "hidden": {"common", "lm"},
    "policies": {"common", "lm"},
    "rl": {"common", "lm", "hidden", "policies"},
    "tasks": {"common", "lm", "hidden", "policies"},
    "": {"common", "lm", "hidden", "policies", "rl", "tasks", ""},  # cli.py, figures.py, __init__.py
}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path, package: str | None = None) -> set[str]:
    """Every module `path` imports (absolute names), at any depth of the file."""
    found = set()
    package = package or module_name(path).rsplit(".", 1)[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative import: resolve against this package
                base = ".".join(
                    package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else [])
                )
            found.add(base)
            found |= {f"{base}.{alias.name}" for alias in node.names}
    return found


def library_graph() -> dict[str, set[str]]:
    modules = {module_name(p): p for p in LIBRARY.rglob("*.py")}
    return {name: {m for m in imports(path) if m in modules and m != name} for name, path in modules.items()}


def layer(module: str) -> str:
    parts = module.split(".")
    if len(parts) > 2 or (len(parts) == 2 and (LIBRARY / parts[1]).is_dir()):
        return parts[1]  # latentlab.lm.sampling and latentlab.lm -> lm
    return ""  # latentlab.cli, latentlab.figures, latentlab


def test_the_library_imports_no_stage_or_flow():
    offenders = {
        module_name(p): sorted(m for m in imports(p) if m.split(".")[0] in {"stages", "flows"})
        for p in LIBRARY.rglob("*.py")
    }
    assert {k: v for k, v in offenders.items() if v} == {}


def test_imports_only_go_down_the_layers():
    upward = []
    for module, targets in library_graph().items():
        for target in targets:
            if layer(target) != layer(module) and layer(target) not in ALLOWED[layer(module)]:
                upward.append(f"{module} -> {target}")
    assert upward == []
    # top-level modules are the top: no package imports cli or figures
    assert not [m for m, t in library_graph().items() if layer(m) and t & {"latentlab.cli", "latentlab.figures"}]


def test_no_import_cycles():
    graph, state, cycles = library_graph(), {}, []

    def visit(node: str, path: list[str]) -> None:
        state[node] = "open"
        for target in sorted(graph[node]):
            if target == "latentlab" or target.endswith("__init__"):
                continue
            if state.get(target) == "open":
                cycles.append(" -> ".join(path[path.index(target) :] + [target]) if target in path else target)
            elif target not in state:
                visit(target, path + [target])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert cycles == []


def test_only_the_execution_layer_touches_torch_distributed():
    """Collectives, process groups and DDP/FSDP wrappers live in latentlab/common/ (the execution layer,
    distributed.py): an algorithm, a policy or the LM code that called them itself would bypass the layer's one
    normalisation and its shard contract (tests/test_execution.py). Both an import and a `torch.distributed...`
    attribute reached through a plain `import torch` count, at any depth of the file."""

    def distributed(name: str) -> bool:
        return any(name == root or name.startswith(f"{root}.") for root in ("torch.distributed", "torch.nn.parallel"))

    def dotted(node: ast.AST) -> str:
        if isinstance(node, ast.Attribute):
            return f"{dotted(node.value)}.{node.attr}"
        return node.id if isinstance(node, ast.Name) else ""

    users = {}
    for path in sorted(LIBRARY.rglob("*.py")):
        used = {dotted(node) for node in ast.walk(ast.parse(path.read_text())) if isinstance(node, ast.Attribute)}
        found = sorted(name for name in imports(path) | used if distributed(name))
        if found:
            users[module_name(path)] = found
    assert "torch.distributed" in users["latentlab.common.distributed"]  # the walk sees them where they are
    assert {module: names for module, names in users.items() if layer(module) != "common"} == {}


@pytest.mark.parametrize(
    "source, expected",
    [
        ("from latentlab.lm import sampling\n", {"latentlab.lm", "latentlab.lm.sampling"}),
        (
            "def f():\n    from latentlab.rl.grpo import GRPOConfig\n",
            {"latentlab.rl.grpo", "latentlab.rl.grpo.GRPOConfig"},
        ),
    ],
)
def test_the_walk_sees_every_import(tmp_path, source, expected):
    """The checks above are only as good as this: module-level and function-level imports both count."""
    file = tmp_path / "probe.py"
    file.write_text(source)
    assert imports(file, package="latentlab.lm") == expected
