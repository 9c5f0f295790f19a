"""The docs: the README and the site are built from the code and the committed JSON, and what they tell you to run
exists. README.md's generated blocks are in sync, the site builds with `mkdocs build --strict`, every command the
README and the getting-started page show parses with its real parser (make targets, `latentlab`, the flows, dvc,
stages, benchmark scripts), every repository path they name exists, and no figure in them is typed by hand."""

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from ruamel.yaml import YAML

from docs.gen import cli_ref, dag, render, results
from docs.gen.hooks import pages

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = ROOT / "docs"
SHOWN = [README, DOCS / "getting-started.md"]  # the pages whose commands a new user types first
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.M | re.S)
SHELL_FENCES = {"bash", "console", "sh", "shell"}
DECIMAL = re.compile(r"(?<![\w.])\d+\.\d+(?![\w.])")
ALLOWED_DECIMALS = re.compile(r"Python 3\.\d+")  # a version, not a measurement


def shell_commands(text: str) -> list[str]:
    """The commands of a page's shell blocks: one per line or `&&` part, comments and env assignments removed."""
    commands = []
    for language, body in FENCE.findall(text):
        if language not in SHELL_FENCES:
            continue
        for line in body.replace("\\\n", " ").splitlines():
            line = line.split(" #")[0].strip()
            if not line or line.startswith("#"):
                continue
            for part in line.split("&&"):
                words = shlex.split(part)
                while words and re.fullmatch(r"[A-Z_]+=\S*", words[0]):  # PYTHONPATH=. python ...
                    words.pop(0)
                if words:
                    commands.append(shlex.join(words))
    return commands


def makefile_targets() -> set[str]:
    return set(re.findall(r"^([\w-]+):", (ROOT / "Makefile").read_text(), re.M))


def dag_outputs() -> list[str]:
    return [o for stage in dag.stages().values() for o in stage["outputs"]]


def repo_path_exists(path: str) -> bool:
    """A path in the repository, or a DAG output (present once `dvc repro` ran), or the docs' build output
    (`make docs`: site/), or a glob of either."""
    path = path.rstrip("/")
    if path == "site":
        return True
    if any(ch in path for ch in "*{<"):
        path = re.split(r"[*{<]", path)[0].rstrip("/") or "."
    if (ROOT / path).exists():
        return True
    return any(path == o or path.startswith(o + "/") or o.startswith(path + "/") for o in dag_outputs())


def _parse(parser, args: list[str], what: str) -> str | None:
    try:
        parser.parse_args(args)
    except SystemExit as error:
        return f"{what}: its parser refuses {args} (exit {error.code})"
    return None


def command_problem(command: str) -> str | None:
    """Why this command would not run as shown (a missing target, module, option or path), or None."""
    words = shlex.split(command)
    program, args = words[0], words[1:]
    if program == "make":
        missing = [t for t in args if t not in makefile_targets()]
        return f"{command}: no Makefile target {missing}" if missing else None
    if program == "latentlab":
        return _parse(cli_ref.parser_of("latentlab"), args, command)
    if program in ("python", "python3") and args[:1] == ["-m"]:
        module, rest = args[1], args[2:]
        if module in {c.split()[-1] for c in cli_ref.COMMANDS if c.startswith("python -m")}:
            return _parse(cli_ref.parser_of(f"python -m {module}"), rest, command)
        if module.startswith("stages."):
            name = module.removeprefix("stages.")
            return None if name in dag.stages() else f"{command}: {name} is not a stage of dvc.yaml"
        return None if (ROOT / (module.replace(".", "/") + ".py")).exists() else f"{command}: no module {module}"
    if program in ("python", "python3") and args and args[0].endswith(".py"):
        return None if (ROOT / args[0]).exists() else f"{command}: no script {args[0]}"
    if program == "torchrun":
        module = args[args.index("-m") + 1]
        return None if (ROOT / (module.replace(".", "/") + ".py")).exists() else f"{command}: no module {module}"
    if program == "dvc":
        from dvc.cli import DvcParserError, parse_args

        try:
            parsed = parse_args(args)
        except (DvcParserError, SystemExit):
            return f"{command}: dvc does not accept it"
        targets = getattr(parsed, "targets", None) or []
        unknown = [t for t in targets if args[0] == "repro" and t not in dag.stages()]
        return f"{command}: no stage {unknown} in dvc.yaml" if unknown else None
    if program in ("source", "git", "cd", "curl", "export", "prefect"):
        return None
    return f"{command}: no check for the program {program!r}; add one to tests/test_docs.py"


def prose(text: str) -> str:
    """A page's text without code (fences and inline), value markers' numbers or HTML comments."""
    text = FENCE.sub("", text)
    text = render.VALUE.sub("", text)
    text = re.sub(r"<!--.*?-->", "", text, flags=re.S)
    return re.sub(r"`[^`]*`", "", text)


def hand_written_pages() -> list[Path]:
    return [README, *sorted(p for p in DOCS.rglob("*.md") if "gen" not in p.relative_to(DOCS).parts)]


def test_readme_is_short_and_in_sync_with_its_generated_blocks():
    text = README.read_text()
    assert len(text.splitlines()) < 200
    assert render.BLOCK.search(text) and render.VALUE.search(text)
    assert render.sync(text) == text, "README.md is out of date: run `make docs`"


def test_a_readme_figure_typed_differently_from_its_json_is_caught():
    text = README.read_text()
    marker = render.VALUE.search(text)
    typed = text.replace(marker[0], f"{marker[1]}999.9{marker[6]}")
    assert render.sync(typed) != typed


def test_readme_figures_equal_their_json():
    for match in render.VALUE.finditer(README.read_text()):
        data = json.loads((ROOT / match[2]).read_text())
        assert float(match[5]) == pytest.approx(results.dig(data, match[3]), abs=0.05), match[0]


@pytest.mark.parametrize("page", hand_written_pages(), ids=lambda p: str(p.relative_to(ROOT)))
def test_no_figure_is_typed_by_hand(page):
    """Decimal figures in prose come from a JSON (a value marker) or a generated table, never from the keyboard."""
    text = ALLOWED_DECIMALS.sub("", prose(page.read_text()))
    assert DECIMAL.findall(text) == []


def test_the_figure_check_can_fail():
    assert DECIMAL.findall(prose("GRPO reached 0.662 on held-out problems (`0.1` is code).")) == ["0.662"]


@pytest.mark.parametrize("page", SHOWN, ids=lambda p: p.name)
def test_every_command_shown_exists(page):
    commands = shell_commands(page.read_text())
    assert any(c.startswith("make ") for c in commands) and any("flows." in c for c in commands)
    assert [p for c in commands if (p := command_problem(c))] == []


def test_the_command_check_can_fail():
    for wrong in [
        "make nonexistent-target",
        "latentlab label --model m --prompts p --out o --no-such-option",
        "python -m flows.pipeline --no-such-option",
        "python -m flows.sweep --seeds",
        "dvc repro no_such_stage",
        "dvc repro --no-such-option",
        "python -m stages.no_such_stage",
        "python benchmarks/no_such_script.py",
    ]:
        assert command_problem(wrong), wrong
    assert command_problem("python -m flows.pipeline --jobs 2 --force grpo") is None


@pytest.mark.parametrize("page", SHOWN, ids=lambda p: p.name)
def test_every_path_named_exists(page):
    text = page.read_text()
    named = re.findall(r"`([\w.-]+/[\w./*{},<>-]*|[\w-]+\.(?:yaml|lock|json|toml|md))`", text)
    named += [m for m in re.findall(r"\]\(([^)#]+)", text) if not m.startswith("http")]
    base = ROOT if page == README else page.parent
    generated = {DOCS / path for path in pages()}  # the site's generated pages exist only in the build
    missing = [p for p in named if not repo_path_exists(p) and not (base / p).exists() and base / p not in generated]
    assert named and missing == []


@pytest.mark.parametrize("module", ["flows.pipeline", "flows.sweep", "flows.deploy", "latentlab.cli"])
def test_each_command_answers_help(module):
    done = subprocess.run([sys.executable, "-m", module, "--help"], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0 and "usage:" in done.stdout, done.stderr


def test_the_params_reference_covers_every_key_of_params_yaml():
    from docs.gen import params_ref

    page = params_ref.page()

    def keys(mapping, prefix=""):
        for key, value in mapping.items():
            if isinstance(value, dict):
                yield from keys(value, f"{prefix}{key}.")
            else:
                yield f"{prefix}{key}"

    listed = set(re.findall(r"^\| `([\w.]+)` \|", page, re.M))
    in_file = set(keys(YAML(typ="safe").load((ROOT / "params.yaml").read_text())))
    assert in_file and in_file <= listed
    assert "(required)" not in page, "every required key has a value in params.yaml"


def test_the_cli_reference_lists_every_command_and_option():
    page = cli_ref.page()
    parser = cli_ref.parser_of("latentlab")
    for name, sub in cli_ref.subcommands(parser).items():
        assert f"`latentlab {name}`" in page
        for action in sub._actions:
            for option in action.option_strings:
                assert option == "-h" or option == "--help" or f"`{option}`" in page, option
    assert "`python -m flows.sweep`" in page and "`--claims`" in page


def test_results_pages_name_their_source_commit_and_machine():
    benchmarks = results.benchmarks_page()
    for path in sorted((ROOT / "results").glob("*-benchmark.json")):
        assert f"Source: `results/{path.name}`" in benchmarks
    assert benchmarks.count("; machine: ") == len(results.benchmarks())
    claims = json.loads((ROOT / "results/claims.json").read_text())["claims"]
    page = results.claims_page()
    for claim_id, claim in claims.items():
        assert f"Claim `{claim_id}`" in page and f"commit `{claim['sweep']['baseline'][:7]}`" in page
    for name in results.sweeps():
        assert "Source: `results/sweeps/" in results.sweep_page(name)


def test_the_dag_is_drawn_from_dvc_yaml():
    spec = YAML(typ="safe").load((ROOT / "dvc.yaml").read_text())["stages"]
    drawn = dag.picture()
    assert all(re.search(rf"\b{name}\b", drawn) for name in spec)
    assert all(f"| `{name}` |" in dag.table() for name in spec)


def test_the_site_builds_strictly(tmp_path):
    """`mkdocs build --strict`: a broken link or anchor, a page missing from the nav's files or a generator error
    fails it (make test runs the same build)."""
    done = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    for page in ["index.html", "reference/params/index.html", "systems/surgery/index.html", "search/search_index.json"]:
        assert (tmp_path / "site" / page).exists(), page
