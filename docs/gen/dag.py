"""The DAG as dvc.yaml declares it: stages, what each reads and writes, and a Mermaid diagram of it."""

import ast
from pathlib import Path, PurePosixPath

from ruamel.yaml import YAML

ROOT = Path(__file__).resolve().parents[2]


def _paths(entries) -> list[str]:
    """dvc.yaml lists entries as plain paths or one-key mappings (`- plots/x.csv: {x: step}`)."""
    return [next(iter(e)) if isinstance(e, dict) else str(e) for e in entries or []]


def stages(root: Path = ROOT) -> dict[str, dict]:
    """name -> {cmd, code (deps that are source files), inputs (other deps), outputs (outs, metrics, plots)}."""
    spec = YAML(typ="safe").load((root / "dvc.yaml").read_text())
    found = {}
    for name, stage in spec["stages"].items():
        deps = _paths(stage.get("deps"))
        found[name] = {
            "cmd": stage["cmd"],
            "code": [d for d in deps if d.endswith(".py")],
            "inputs": [d for d in deps if not d.endswith(".py")],
            "outputs": _paths(stage.get("outs")) + _paths(stage.get("metrics")) + _paths(stage.get("plots")),
            "always_changed": bool(stage.get("always_changed")),
        }
    return found


def _under(path: str, output: str) -> bool:
    return path == output or PurePosixPath(path).is_relative_to(output)


def edges(found: dict[str, dict]) -> list[tuple[str, str]]:
    """(producer, consumer) for every stage that reads another's output (or a path inside it)."""
    pairs = []
    for consumer, stage in found.items():
        for producer, other in found.items():
            if producer != consumer and any(_under(i, o) for i in stage["inputs"] for o in other["outputs"]):
                pairs.append((producer, consumer))
    return pairs


def summary(name: str, root: Path = ROOT) -> str:
    """The first sentence of the stage module's docstring (`stages/<name>.py`), without the leading `name:`."""
    module = root / "stages" / f"{name}.py"
    if not module.exists():
        return ""
    doc = ast.get_docstring(ast.parse(module.read_text())) or ""
    first = " ".join(doc.split("\n\n")[0].split())
    return first.removeprefix(f"{name}:").strip()


def reduced(pairs: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """The edges no longer path replaces (a transitive reduction): the picture shows each dependency once."""
    after = {a: {b for x, b in pairs if x == a} for a, _ in pairs}

    def reachable(start: str, skip: tuple[str, str]) -> set[str]:
        seen, todo = set(), [start]
        while todo:
            node = todo.pop()
            for nxt in after.get(node, ()):
                if (node, nxt) != skip and nxt not in seen:
                    seen.add(nxt)
                    todo.append(nxt)
        return seen

    return [(a, b) for a, b in pairs if b not in reachable(a, (a, b))]


def picture(root: Path = ROOT) -> str:
    """The stages as boxes, inputs above what reads them: `dvc dag`'s own drawing (dvc.dagascii), each dependency
    drawn once. Plain text, so it reads the same in a terminal, on GitHub and in the docs."""
    from dvc.dagascii import draw

    found = stages(root)
    drawing = draw(list(found), [(b, a) for a, b in reduced(edges(found))])
    return "```text\n" + "\n".join(line.rstrip() for line in drawing.splitlines()) + "\n```"


def table(root: Path = ROOT) -> str:
    """Stage | what it does (its module's docstring) | reads (data, not code) | writes."""
    found = stages(root)
    lines = ["| stage | does | reads | writes |", "|---|---|---|---|"]
    for name, stage in found.items():
        reads = ", ".join(f"`{i}`" for i in stage["inputs"]) or "–"
        writes = ", ".join(f"`{o}`" for o in stage["outputs"])
        does = summary(name, root) + (" Runs on every `dvc repro`." if stage["always_changed"] else "")
        lines.append(f"| `{name}` | {does} | {reads} | {writes} |")
    return "\n".join(lines)
