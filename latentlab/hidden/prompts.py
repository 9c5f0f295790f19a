"""The files of `latentlab label`: prompts to read (Parquet, JSON Lines, plain text) and outputs to write,
checked before any work with errors that name the file (and the row)."""

import json
import os
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
        return path.read_text(encoding="utf-8")
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
        ids = table["id"].cast(pl.Int64).to_list()
    nulls = table[column].is_null()
    if nulls.any():
        row = int(nulls.arg_max())
        raise InputError(f"{path}: row {row} has no {column!r} (null)")
    return table[column].to_list(), ids


def _jsonl_prompts(path: Path, column: str) -> tuple[list[str], list[int] | None]:
    prompts, ids = [], []
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
    if any(i is None for i in ids):
        return prompts, None
    if not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
        raise InputError(f"{path}: field 'id' must be an integer on every line")
    return prompts, ids


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
