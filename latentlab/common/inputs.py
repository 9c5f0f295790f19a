"""Reading stage inputs with errors that name the file and what is wrong with it."""

from pathlib import Path

import polars as pl

from latentlab.common.errors import InputError


def read_table(path: str | Path, schema: dict[str, pl.DataType]) -> pl.DataFrame:
    """A Parquet file that must hold at least the columns of `schema`, with those types, and a row."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path} does not exist (run the stage that writes it, e.g. `dvc repro`)")
    try:
        table = pl.read_parquet(path)
    except Exception as error:  # polars raises several types for a damaged file
        raise InputError(f"{path} is not a readable Parquet file: {error}") from error
    missing = [c for c in schema if c not in table.columns]
    if missing:
        raise InputError(f"{path} lacks column(s) {missing}; it has {table.columns}")
    wrong = {c: str(table.schema[c]) for c, t in schema.items() if table.schema[c] != t}
    if wrong:
        raise InputError(
            f"{path} has column(s) of the wrong type {wrong}; expected {dict((c, str(schema[c])) for c in wrong)}"
        )
    if table.height == 0:
        raise InputError(f"{path} has no rows")
    return table


def require_model_dir(path: str | Path) -> Path:
    path = Path(path)
    if not (path / "config.json").exists():
        raise InputError(f"{path} is not a saved model (no {path / 'config.json'}); run the stage that writes it")
    return path
