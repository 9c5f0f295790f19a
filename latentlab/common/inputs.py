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


# what a saved model directory needs, each as (accepted file names, what it is)
MODEL_FILES = (
    (("config.json",), "the model config"),
    (("model.safetensors", "model.safetensors.index.json"), "the weights"),
    (("tokenizer.json", "tokenizer_config.json"), "the tokenizer"),
)


def missing_model_files(path: Path) -> str | None:
    """The first thing a Hugging Face model directory lacks, as 'no <file> (<what>)', or None."""
    for names, what in MODEL_FILES:
        if not any((path / name).exists() for name in names):
            return f"no {' or '.join(names)} ({what})"
    return None


def require_model_dir(path: str | Path, manifest: str | None = "latentlab.json") -> Path:
    """A model directory a stage wrote: config, weights, tokenizer and (by default) the provenance
    manifest; anything missing stops the stage with one line naming the directory and the file."""
    path = Path(path)
    if not path.is_dir():
        raise InputError(f"{path} does not exist: run the stage that writes it (e.g. `dvc repro`)")
    problem = missing_model_files(path)
    if problem is None and manifest is not None and not (path / manifest).exists():
        problem = f"no {manifest} (the provenance manifest every stage writes)"
    if problem:
        raise InputError(f"{path} is not a complete saved model: {problem}; run the stage that writes it again")
    return path
