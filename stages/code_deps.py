"""dvc.yaml's code deps, generated: every project file a stage runs, found by walking its imports.

    make dvc-deps                          # rewrite dvc.yaml's code deps (python -m stages.code_deps)
    python -m stages.code_deps --check     # exit 1, naming the stages, when dvc.yaml is out of date

A stage's deps are its script, then every latentlab/, stages/ and flows/ file it imports directly or through others
(function-level imports too), sorted, then the data and models it reads, which are written by hand and kept in
their order. Editing code therefore reruns exactly the stages it feeds. The packages' __init__.py files are left
out: they hold no code that changes an output (the OpenMP wait policy; the kernel pins live in
latentlab/common/numerics.py, which they import). tests/test_dvc_yaml.py fails while the file is out of date.
"""

import argparse
import ast
import io
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CODE = ("latentlab/", "stages/", "flows/")
# The params schema imports every config class, but what a stage reads from it are values, which dvc.yaml tracks
# as params (and tests/test_params.py checks params.yaml spells out every key); its imports are not code it runs.
SCHEMA = "stages/params.py"


def imported_project_files(path: Path) -> set[str]:
    """Every latentlab/, stages/ and flows/ file the script runs, imported directly or through others (function-level
    too), relative to the project root, `__init__.py` files included."""
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
                if not name.startswith(("latentlab", "stages", "flows")):
                    continue
                file = ROOT / (name.replace(".", "/") + ".py")
                if not file.is_file():  # a package: its __init__.py
                    file = ROOT / name.replace(".", "/") / "__init__.py"
                relative = str(file.relative_to(ROOT))
                if file.is_file() and relative not in seen and relative != SCHEMA:
                    seen.add(relative)
                    pending.append(file)
    return seen


def script_of(stage: dict) -> str:
    """The stage's script: `python -m stages.x` -> stages/x.py."""
    return stage["cmd"].split()[-1].replace(".", "/") + ".py"


def code_deps(stage: dict) -> list[str]:
    """The script, then every project file it runs but the packages' __init__.py files, sorted."""
    script = script_of(stage)
    files = {f for f in imported_project_files(ROOT / script) if not f.endswith("__init__.py")} - {script}
    return [script, *sorted(files)]


def generated(text: str) -> tuple[str, list[str]]:
    """dvc.yaml's text with every stage's code deps regenerated (comments and the rest kept), and the names of
    the stages whose deps changed."""
    from ruamel.yaml import YAML

    yaml = YAML()  # round trip: comments, order and style stay as written
    yaml.width = 4096
    yaml.indent(mapping=2, sequence=4, offset=2)
    document = yaml.load(text)
    changed = []
    for name, stage in document["stages"].items():
        deps = stage["deps"]
        other = [d for d in deps if not (isinstance(d, str) and d.startswith(CODE) and d.endswith(".py"))]
        wanted = code_deps(stage) + other
        if list(deps) != wanted:
            changed.append(name)
            deps.clear()
            deps.extend(wanted)
    out = io.StringIO()
    yaml.dump(document, out)
    return out.getvalue(), changed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m stages.code_deps", description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="change nothing; exit 1 if dvc.yaml is out of date")
    parser.add_argument("--dvc-yaml", type=Path, default=ROOT / "dvc.yaml", help="the file (default: dvc.yaml)")
    args = parser.parse_args(argv)
    text = args.dvc_yaml.read_text()
    new, changed = generated(text)
    if args.check:
        if new != text:
            print(
                f"{args.dvc_yaml}: code deps out of date in {', '.join(changed) or 'formatting'}: run `make dvc-deps`"
            )
            return 1
        return 0
    if new != text:
        args.dvc_yaml.write_text(new)
    print(
        f"{args.dvc_yaml}: code deps of {len(changed)} stage(s) rewritten{': ' + ', '.join(changed) if changed else ''}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
