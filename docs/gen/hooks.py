"""mkdocs hooks (mkdocs.yml `hooks:`): add the generated pages, and expand the markers of the hand-written ones.

Generated pages exist only in the build (nothing to commit, nothing to drift): the params and CLI references from
the code, the results pages from the committed JSON under results/.
"""

import sys
from pathlib import Path

from mkdocs.structure.files import File

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # the generators import the project (stages.params, latentlab.cli, flows)
    sys.path.insert(0, str(ROOT))

from docs.gen import cli_ref, params_ref, render, results  # noqa: E402


def on_config(config):
    """mkdocs restores sys.path after loading a hook: put the project back on it for the generators' imports."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    return config


def pages() -> dict[str, str | bytes]:
    """Generated page path (under docs/) -> its content."""
    found: dict[str, str | bytes] = {
        "reference/params.md": params_ref.page(),
        "reference/cli.md": cli_ref.page(),
        "results/claims.md": results.claims_page(),
        "results/benchmarks.md": results.benchmarks_page(),
        "results/sweeps/index.md": results.sweeps_page(),
    }
    for name in results.sweeps():
        found[f"results/sweeps/{name}/index.md"] = results.sweep_page(name)
        for figure in sorted((results.RESULTS / "sweeps" / name).glob("*.png")):
            found[f"results/sweeps/{name}/{figure.name}"] = figure.read_bytes()
    return found


def on_files(files, config):
    for path, content in pages().items():
        if files.get_file_from_path(path) is not None:
            raise RuntimeError(f"docs/{path} is generated: remove the hand-written file")
        files.append(File.generated(config, path, content=content))
    return files


def on_page_markdown(markdown, page, config, files):
    return render.expand(markdown)
