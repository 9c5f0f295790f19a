"""The `latentlab` command: tools around the hidden-state stores that are not DAG stages.

    latentlab serve --model models/base --layers -1 --tokens 1         # HTTP API (latentlab/serve.py)
    latentlab extract --model models/base --rows data/labels/full.parquet --out data/hidden/full_text.zarr
    latentlab npz export data/hidden/full.zarr out.npz --table data/labels/full.parquet
    latentlab npz export data/hidden/grid.zarr grid.npz --table data/labels/grid.parquet --transitions data/grid/transitions.zarr
    latentlab npz import reference.npz data/hidden/reference.zarr --table data/labels/reference.parquet

`extract` is re-extraction: the text of an earlier run (a `text_generated` column, or the exact
`token_ids`) teacher-forced through a model in one pass, pooled over the same positions as
generation, resumable like the label stage.
"""

import argparse
import sys
from pathlib import Path

from pydantic import ValidationError

from latentlab.common.errors import InputError
from latentlab.hidden import serve


def extract(args: argparse.Namespace) -> None:
    import polars as pl
    import torch

    from latentlab.common.inputs import read_table
    from latentlab.common.runtime import resolve_device, seed_everything
    from latentlab.hidden.extract import Extractor, TokenRows
    from latentlab.hidden.labelling import LabelConfig, label, prepare
    from latentlab.lm.modeling import describe_model, load_lm

    seed_everything(args.seed)
    cfg = LabelConfig(
        layers=args.layers,
        store_tokens=args.store_tokens,
        batch_size=args.batch_size,
        shard_rows=args.shard_rows,
        dtype=args.dtype,
    )
    column = args.ids_column or args.text_column
    rows = read_table(args.rows, {"id": pl.Int64, "prompt": pl.String})
    if column not in rows.columns:
        raise ValueError(f"{args.rows} has no column {column!r}; it has {rows.columns}")
    model, tokenizer = load_lm(args.model, resolve_device(args.device), dtype=getattr(torch, cfg.dtype))
    extractor = Extractor(model, tokenizer, cfg)
    if args.ids_column:
        completions = TokenRows.from_lists(rows[column].to_list())
    else:
        ended = rows[args.ended_column].to_list() if args.ended_column in rows.columns else None
        completions = extractor.completion_ids(rows[column].to_list(), ended)
    name = Path(args.out).stem
    job = prepare(extractor, name, rows, cfg, args.seed, describe_model(args.model), completions)
    work = Path(args.out).parent / f".{Path(args.out).name}.work"
    label(extractor, job, Path(args.out), Path(args.table_out) if args.table_out else None, work)
    print(f"{args.out}: {rows.height} rows re-extracted from {column}")


def npz_export(args: argparse.Namespace) -> None:
    from latentlab.hidden.npz import export_npz

    keys = export_npz(args.store, args.out, args.table, args.layer, args.transitions)
    print(f"{args.out}: {', '.join(keys)}")


def npz_import(args: argparse.Namespace) -> None:
    from latentlab.hidden.npz import import_npz

    rows = import_npz(args.npz, args.store, args.table, args.layer)
    print(f"{args.store}: {rows} rows imported from {args.npz}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="latentlab", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)

    serve_parser = commands.add_parser("serve", help="HTTP API: mean-pooled hidden states of prompts")
    serve.add_arguments(serve_parser)
    serve_parser.set_defaults(run=serve.run)

    ex = commands.add_parser("extract", help="re-extract hidden states of existing text (teacher-forced)")
    ex.add_argument("--model", default="models/base")
    ex.add_argument(
        "--rows", required=True, help="Parquet with id, prompt and the text (e.g. data/labels/full.parquet)"
    )
    ex.add_argument("--out", required=True, help="the Zarr store to write")
    ex.add_argument("--table-out", help="also write the rows with n_positions here (Parquet)")
    ex.add_argument("--text-column", default="text_generated")
    ex.add_argument("--ended-column", default="ended", help="rows where it is true get end-of-sequence appended")
    ex.add_argument("--ids-column", help="take exact token ids from this column instead (e.g. token_ids)")
    ex.add_argument("--layers", type=int, nargs="+", default=[-1])
    ex.add_argument("--store-tokens", action="store_true")
    ex.add_argument("--batch-size", type=int, default=256)
    ex.add_argument("--shard-rows", type=int, default=1024)
    ex.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ex.add_argument("--device", default="auto")
    ex.add_argument("--seed", type=int, default=0)
    ex.set_defaults(run=extract)

    npz = commands.add_parser("npz", help="the reference NPZ format").add_subparsers(dest="direction", required=True)
    out = npz.add_parser("export", help="store (+ row table) -> reference NPZ")
    out.add_argument("store")
    out.add_argument("out")
    out.add_argument("--table", help="row table with text_generated / prompt / log_prob")
    out.add_argument("--layer", type=int, help="which stored layer (as asked for, e.g. -1; default: the last)")
    out.add_argument("--transitions", help="Zarr group with the transition arrays, e.g. data/grid/transitions.zarr")
    out.set_defaults(run=npz_export)
    into = npz.add_parser("import", help="reference NPZ -> store (+ row table with the text)")
    into.add_argument("npz")
    into.add_argument("store")
    into.add_argument("--table")
    into.add_argument("--layer", type=int, default=-1, help="the layer the file holds, recorded in the store")
    into.set_defaults(run=npz_import)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except ValidationError as error:  # an option out of bounds: name it, one line
        print(
            "error: "
            + "; ".join(f"--{'.'.join(map(str, e['loc'])).replace('_', '-')}: {e['msg']}" for e in error.errors()),
            file=sys.stderr,
        )
        sys.exit(2)
    except (ValueError, FileNotFoundError, InputError) as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
