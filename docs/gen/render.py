"""Markers in hand-written markdown (README.md and docs/) replaced by generated text.

    <!-- gen:NAME ARGS -->                       docs pages: the line becomes NAME's markdown (at build time)
    <!-- begin gen:NAME ARGS -->...<!-- end gen:NAME -->   README.md: the text between is NAME's markdown
    <!-- value FILE KEY [FORMAT] -->X<!-- /value -->       one figure of a committed JSON: X is rewritten from it

An unknown NAME, file or key raises: the build fails rather than show a stale or missing figure.
"""

import re
import shlex

from docs.gen import dag, params_ref, results

GENERATORS = {
    "dag-diagram": lambda: dag.picture(),
    "dag-table": lambda: dag.table(),
    "params": lambda *sections: "\n\n".join(params_ref.section(s, level=3) for s in sections),
    "claims": lambda *ids: "\n\n".join(results.claim(i, 3) for i in ids),
    "benchmark": lambda *names: "\n\n".join(results.benchmark(n, 3) for n in names),
    "provenance": lambda path: results.provenance(path),
}
LINE = re.compile(r"<!-- gen:(\S+)(.*?) -->")
BLOCK = re.compile(r"(<!-- begin gen:(\S+)(.*?) -->\n)(.*?)(<!-- end gen:\2 -->)", re.S)
VALUE = re.compile(r"(<!-- value (\S+) (\S+)(?: (\S+))? -->)(.*?)(<!-- /value -->)")


def generate(name: str, arguments: str) -> str:
    if name not in GENERATORS:
        raise KeyError(f"unknown generated block gen:{name} (known: {', '.join(GENERATORS)})")
    return GENERATORS[name](*shlex.split(arguments))


def values(text: str) -> str:
    return VALUE.sub(lambda m: m[1] + results.value(m[2], m[3], m[4] or "") + m[6], text)


def blocks(text: str) -> str:
    return BLOCK.sub(lambda m: m[1] + generate(m[2], m[3]).rstrip("\n") + "\n" + m[5], text)


def expand(text: str) -> str:
    """A docs page's markdown with every marker replaced (the mkdocs hook calls this for each page)."""
    return values(blocks(LINE.sub(lambda m: generate(m[1], m[2]), text)))


def sync(text: str) -> str:
    """README.md with its generated blocks and values brought up to date (its markers stay for the next sync)."""
    return values(blocks(text))
