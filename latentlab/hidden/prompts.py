"""The files of `latentlab label`: prompts to read (Parquet, JSON Lines, plain text) and outputs to write,
checked before any work with errors that name the file (and the row)."""

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import polars as pl

from latentlab.common.errors import InputError

PARQUET, JSONL = (".parquet", ".pq"), (".jsonl", ".ndjson")


def read_prompts(path: str | Path, column: str = "prompt") -> pl.DataFrame:
    """Prompts to label, as `id (int64), prompt (string)`, from Parquet (the column `column`), JSON
    Lines (the field `column` of each object; blank lines skipped) or plain text (any other suffix:
    one prompt per line). `id` is the file's own `id` column or field when it has one (integers),
    else the 0-based row number. Anything wrong stops with one line naming the file (and the row)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such prompts file")
    if path.suffix.lower() in PARQUET:
        prompts, ids = _parquet_prompts(path, column)
    elif path.suffix.lower() in JSONL:
        prompts, ids = _jsonl_prompts(path, column)
    else:
        prompts, ids = _text_prompts(path), None
    if not prompts:
        raise InputError(f"{path} is empty: no prompts to label")
    if ids is None:
        ids = list(range(len(prompts)))
    return pl.DataFrame({"id": ids, "prompt": prompts}, schema={"id": pl.Int64, "prompt": pl.String})


def _text_lines(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8-sig")  # a byte-order mark (Windows editors write one) is dropped
    except UnicodeDecodeError as error:
        raise InputError(f"{path} is not UTF-8 text: {error}") from None


def _text_prompts(path: Path) -> list[str]:
    """One prompt per line ("\\n" or "\\r\\n"); a final newline ends the last line, it adds no row."""
    text = _text_lines(path)
    if not text:
        return []
    lines = text.split("\n")
    if lines[-1] == "":
        lines.pop()
    return [line.removesuffix("\r") for line in lines]


def _parquet_prompts(path: Path, column: str) -> tuple[list[str], list[int] | None]:
    try:
        table = pl.read_parquet(path)
    except Exception as error:  # polars raises several types for a damaged file
        raise InputError(f"{path} is not a readable Parquet file: {error}") from None
    if column not in table.columns:
        raise InputError(f"{path} has no column {column!r} (it has {table.columns}); choose one with --column")
    if table.schema[column] != pl.String:
        raise InputError(f"{path}: column {column!r} holds {table.schema[column]}, not text")
    ids = None
    if "id" in table.columns:
        if not table.schema["id"].is_integer():
            raise InputError(f"{path}: column 'id' holds {table.schema['id']}, not integers")
        if table["id"].null_count():
            raise InputError(f"{path}: row {int(table['id'].is_null().arg_max())} has no 'id' (null)")
        ids = table["id"].cast(pl.Int64).to_list()
        if table["id"].n_unique() < table.height:
            _require_unique(path, ids, list(range(table.height)), "in rows")
    nulls = table[column].is_null()
    if nulls.any():
        row = int(nulls.arg_max())
        raise InputError(f"{path}: row {row} has no {column!r} (null)")
    return table[column].to_list(), ids


def _jsonl_prompts(path: Path, column: str) -> tuple[list[str], list[int] | None]:
    prompts, ids, lines = [], [], []
    for number, line in enumerate(_text_lines(path).splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise InputError(f"{path}: line {number} is not JSON: {error}") from None
        if not isinstance(record, dict) or column not in record:
            fields = list(record) if isinstance(record, dict) else type(record).__name__
            raise InputError(f"{path}: line {number} has no field {column!r} ({fields}); choose one with --column")
        if not isinstance(record[column], str):
            raise InputError(f"{path}: line {number}: field {column!r} is not a string")
        prompts.append(record[column])
        ids.append(record.get("id"))
        lines.append(number)
    if any(i is None for i in ids):
        return prompts, None
    if not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
        raise InputError(f"{path}: field 'id' must be an integer on every line")
    _require_unique(path, ids, lines, "on lines")
    return prompts, ids


def _require_unique(path: Path, ids: list[int], places: list[int], where: str) -> None:
    """Ids name rows (the store's `ids`, joins with the row table): the first one seen twice is refused."""
    seen: dict[int, int] = {}
    for row_id, place in zip(ids, places):
        if row_id in seen:
            raise InputError(f"{path}: id {row_id} appears {where} {seen[row_id]} and {place}; ids must be unique")
        seen[row_id] = place


def require_writable(path: str | Path) -> Path:
    """An output path that can be written: its nearest existing ancestor is a writable directory
    (checked before any work, so a run never fails at its end for want of a place to write)."""
    path = Path(path)
    ancestor = path.parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise InputError(f"cannot write {path}: {ancestor} is a file, not a directory")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise InputError(f"cannot write {path}: {ancestor} is not writable")
    return path


# Outputs a command may replace, and the inputs it must never touch: one line naming the path and what to do.


@dataclass(frozen=True)
class Place:
    """A path (or fsspec URL) a command reads or writes, and how messages call it."""

    name: str  # as the user knows it: "--out", "--prompts", "the row table"
    path: Path | str
    noun: str = ""  # what an input is: "file", "directory" ("the --prompts file")
    advice: str = ""  # what to do when an output is refused (default: choose another one)

    @property
    def what(self) -> str:
        return f"the {self.name} {self.noun}" if self.noun else self.name

    @property
    def instead(self) -> str:
        return self.advice or f"choose another {self.name}"


def _key(location: Path | str) -> str:
    """A location compared with others: a URL as written (no trailing slash), a local path absolute and resolved."""
    return str(location).rstrip("/") if "://" in str(location) else str(Path(location).expanduser().resolve())


def _same(a: Path | str, b: Path | str) -> bool:
    if _key(a) == _key(b):
        return True
    try:  # the same file under another name (a case-insensitive file system, a bind mount)
        return "://" not in str(a) + str(b) and os.path.samefile(a, b)
    except OSError:
        return False


def _inside(inner: Path | str, outer: Path | str) -> bool:
    return _key(inner).startswith(_key(outer).rstrip("/") + "/")


def require_apart(outputs: list[Place], inputs: list[Place]) -> None:
    """Refuse (InputError) any output that is an input or another output, or holds an input or another
    output (replacing it would delete them): checked before any work. (Writing inside an input's directory
    deletes nothing of it; what stands at an output's path is judged by `require_replaceable`.)"""
    for i, out in enumerate(outputs):
        for source in inputs:
            if _same(out.path, source.path):
                raise InputError(f"{out.name} {out.path} is {source.what}; {out.instead}")
            if _inside(source.path, out.path):
                raise InputError(
                    f"{source.name} {source.path} is inside {out.name} {out.path}, which would be replaced; "
                    f"move it, or {out.instead}"
                )
        for other in outputs[:i]:
            if _same(out.path, other.path):
                raise InputError(f"{out.name} {out.path} is {other.what} itself; {out.instead}")
            if _inside(out.path, other.path) or _inside(other.path, out.path):
                raise InputError(f"{out.name} {out.path} and {other.what} {other.path} overlap; {out.instead}")


def _exists(location: Path | str) -> bool:
    if "://" in str(location):
        from latentlab.hidden.store import filesystem

        fs, root = filesystem(location)
        return fs.exists(root)
    return Path(location).exists() or Path(location).is_symlink()


def require_replaceable(place: Place, allowed: Callable[[Path | str], bool], kind: str) -> None:
    """Refuse (InputError) an output that exists and is not `kind` (`allowed` says): a command
    replaces only what it writes itself, never a file or directory of another kind."""
    if _exists(place.path) and not allowed(place.path):
        raise InputError(
            f"{place.name} {place.path} exists and is not {kind}; nothing was written: "
            f"remove it yourself if it is not needed, or {place.instead}"
        )


STORE = "a hidden-state store (a Zarr group whose format is latentlab.hidden/1)"
TABLE = "a table latentlab wrote beside a store (Parquet with id and n_positions)"


def require_store_output(place: Place) -> None:
    """An output store: absent, or a hidden-state store (which a rerun resumes or replaces)."""
    from latentlab.hidden.store import is_hidden_store

    require_replaceable(place, is_hidden_store, STORE)


def require_table_output(place: Place) -> None:
    """An output row table: absent, or a row table of a store."""
    from latentlab.hidden.store import is_row_table

    require_replaceable(place, is_row_table, TABLE)
