"""The `latentlab` command: tools around the hidden-state stores that are not DAG stages.

    latentlab label --model models/base --prompts prompts.txt --out hidden/mine.zarr --layers 2 -1 --tokens 8
    latentlab label --model models/base --prompts prompts.txt --out s3://bucket/hidden/mine.zarr   # any fsspec URL
    latentlab info hidden/mine.zarr [--json]
    latentlab serve --model models/base --layers -1 --tokens 1         # HTTP API (latentlab/serve.py)
    latentlab extract --model models/base --rows data/labels/full.parquet --out data/hidden/full_text.zarr
    latentlab npz export data/hidden/full.zarr out.npz --table data/labels/full.parquet
    latentlab npz export data/hidden/grid.zarr grid.npz --table data/labels/grid.parquet --transitions data/grid/transitions.zarr
    latentlab npz import reference.npz data/hidden/reference.zarr --table data/labels/reference.parquet

`extract` is re-extraction: the text of an earlier run (a `text_generated` column, or the exact
`token_ids`) teacher-forced through a model in one pass, pooled over the same positions as
generation, resumable like the label stage. `label` is the label stage's run (the same function)
over any prompts file: Parquet (a column), JSON Lines (a field) or plain text (one prompt a line);
rerun the same command after a kill to resume; `torchrun --nproc_per_node N -m latentlab.cli label ...`
splits it across N processes.
"""

import argparse
import os
import sys
from pathlib import Path

from pydantic import ValidationError

from latentlab.common.errors import describe_failure
from latentlab.hidden import serve
from latentlab.hidden.extract import add_pooling_argument
from latentlab.lm.prompt_format import add_prompt_arguments, prompt_format_of


def label_config(args: argparse.Namespace):
    """The LabelConfig of a command's options (those it has; the others keep their defaults)."""
    from latentlab.hidden.labelling import LabelConfig

    return LabelConfig(**{name: getattr(args, name) for name in LabelConfig.model_fields if hasattr(args, name)})


def extract(args: argparse.Namespace) -> None:
    import polars as pl
    import torch

    from latentlab.common.inputs import read_table
    from latentlab.common.runtime import resolve_device, seed_everything
    from latentlab.hidden.extract import Extractor, TokenRows
    from latentlab.hidden.labelling import label, prepare
    from latentlab.hidden.prompts import Place
    from latentlab.lm.modeling import describe_model, load_lm

    seed_everything(args.seed)
    cfg = label_config(args)
    column = args.ids_column or args.text_column
    out = output_location(args.out)
    table = output_location(args.table_out) if args.table_out else None
    require_safe_outputs(
        Place("--out", out),
        Place("--table-out", table) if table else None,
        [Place("--rows", args.rows, "file"), model_input(args.model)],
    )
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
    name = Path(str(out)).stem
    job = prepare(extractor, name, rows, cfg, args.seed, describe_model(args.model), completions)
    label(extractor, job, out, table, work_dir(out))
    print(f"{args.out}: {rows.height} rows re-extracted from {column}")


def work_dir(out: Path | str) -> Path | str:
    """Where a command's run keeps its work in progress (what a rerun resumes from): beside the output,
    on the same storage (a URL beside a URL: `s3://bucket/.x.zarr.work`)."""
    from latentlab.hidden.store import is_url

    if is_url(out):
        parent, name = str(out).rstrip("/").rsplit("/", 1)
        return f"{parent}/.{name}.work"
    return out.parent / f".{out.name}.work"


def output_location(out: str) -> Path | str:
    """--out as a local path checked writable before any work, or an fsspec URL (s3://bucket/x.zarr) as it is."""
    from latentlab.hidden.prompts import require_writable
    from latentlab.hidden.store import is_url

    return out.rstrip("/") if is_url(out) else require_writable(out)


def with_suffix(out: Path | str, suffix: str) -> Path | str:
    return out.with_suffix(suffix) if isinstance(out, Path) else out.rsplit(".", 1)[0] + suffix


def model_input(model: str):
    """--model as an input to keep apart from the outputs, when it is a local directory (not a hub id)."""
    from latentlab.hidden.prompts import Place

    return Place("--model", model, "directory") if Path(model).expanduser().exists() else None


def require_safe_outputs(store, table, inputs: list, work: bool = True) -> None:
    """Before any work: no output (the `store`, its row `table`, the work directory beside the store; each
    a prompts.Place) is an input or inside one, or holds one; the store is absent or a hidden-state store
    (resumed or replaced as before), the table absent or a row table. Anything else stops in one line,
    nothing touched."""
    from latentlab.hidden.prompts import Place, require_apart, require_store_output, require_table_output

    outputs = [store, *([table] if table else [])]
    if work:  # removed when a run starts over
        outputs.append(Place(f"the work directory of {store.name}", work_dir(store.path), advice=store.instead))
    require_apart(outputs, [source for source in inputs if source is not None])
    require_store_output(store)
    if table is not None:
        require_table_output(table)


BESIDE = "name it with --table, or choose another --out"  # the row table's path comes from --out


def label_command(args: argparse.Namespace) -> None:
    from latentlab.common.distributed import distributed
    from latentlab.common.runtime import resolve_device, seed_everything
    from latentlab.hidden.labelling import LabelSet, label_sets
    from latentlab.hidden.prompts import Place, read_prompts

    # default: about 1024 rows a shard, a whole number of batches
    args.shard_rows = args.shard_rows or args.batch_size * max(1, 1024 // args.batch_size)
    cfg = label_config(args)
    rows = read_prompts(args.prompts, args.column)
    out = output_location(args.out)
    table = output_location(args.table or str(with_suffix(out, ".parquet")))
    require_safe_outputs(
        Place("--out", out),
        Place("--table", table) if args.table else Place("the row table", table, advice=BESIDE),
        [Place("--prompts", args.prompts, "file"), model_input(args.model)],
    )
    model = Path(args.model).expanduser()
    if not model.exists() and (args.model.startswith((".", "/", "~")) or args.model.count("/") > 1):
        raise FileNotFoundError(f"--model {args.model}: no such model directory (nor a hub id like org/name)")
    seed_everything(args.seed)
    with distributed() as ranks:
        # the job's name is the store's: the same rows and settings as a stage's set give its store
        target = LabelSet(Path(str(out)).stem, rows, out, table, work_dir(out), source=str(args.prompts))
        device, prompt_format = resolve_device(args.device), prompt_format_of(args)
        label_sets(model if model.exists() else args.model, [target], cfg, args.seed, device, ranks, prompt_format)
        if ranks.rank == 0:
            print(f"{out}: {rows.height} rows of {args.prompts} labelled; rows and generated text in {table}")


def info_command(args: argparse.Namespace) -> None:
    import json

    from latentlab.hidden.info import describe_store
    from latentlab.hidden.store import filesystem, is_url, store_location

    store = location = store_location(args.store)  # location: where the store's files are now
    if is_url(store):  # written in place: an unfinished store is the store itself, its markers beside it
        report = describe_store(store)
        fs, work = filesystem(work_dir(store))
        if not report["complete"] and fs.exists(work):
            report["shards_done"] = len(fs.find(f"{work}/done"))
    elif not store.exists() and (location := work_dir(store) / "store.zarr").exists():  # killed before it finished
        done = len(list(location.parent.glob("done/*")))
        report = describe_store(location) | {"path": str(store), "shards_done": done}
    else:
        report = describe_store(store)
    if args.verify:  # every chunk read back; the first damaged one stops here, named (StoreDamaged)
        from latentlab.common.tracking import progress
        from latentlab.hidden.store import verify_store

        report["verified"] = verify_store(location, lambda total: progress(None, "verify", total=total, unit="chunk"))
    if args.json:
        print(json.dumps(report, indent=2))
        return
    print(format_info(report))


def format_info(report: dict) -> str:
    model = report["model"] or {}
    state = "complete" if report["complete"] else "INCOMPLETE (a run did not finish; rerun it to resume)"
    verified = report.get("verified")
    if verified is None:
        state += " (not verified: --verify reads every chunk)" if report["complete"] else ""
    else:
        state += f", verified: every chunk of {verified['arrays']} arrays read back ({verified['chunks']} chunks"
        state += ", checksummed)" if verified["checksums"] else "; no chunk checksums in this store: decoding only)"
    if "shards_done" in report:
        state += f", {report['shards_done']} shard(s) done"
    mode = report["mode"]
    if mode == "generate":
        mode += f", {report['tokens']} tokens"
    lines = [
        f"{report['path']}: {state}",
        f"  model    {model.get('path')} (source {model.get('source')})",
        f"  sha256   {model.get('sha256')}",
        f"  mode     {mode}; {report['pooling']} over {report['positions']}",
        f"  rows     {report['rows']}, hidden size {report['hidden_size']}, computed in {report['dtype']}",
        "  layers   "
        + "\n           ".join(
            f"{layer['layer']:>3} (output_hidden_states[{layer['index']}]) = {layer['hook_name'] or 'hook name not recorded'}"
            for layer in report["layers"]
        ),
    ]
    arrays = [f"{n} {tuple(a['shape'])} {a['dtype']}, chunks {tuple(a['chunks'])}" for n, a in report["arrays"].items()]
    lines.append("  arrays   " + "\n           ".join(arrays))
    if report["normalization"]:
        lines.append(f"  normalization statistics for: {', '.join(report['normalization'])}")
    lines.append(f"  on disk  {report['bytes'] / 2**20:,.2f} MiB in {report['files']} files")
    return "\n".join(lines)


def npz_export(args: argparse.Namespace) -> None:
    from latentlab.hidden.npz import ARCHIVE, export_npz, is_npz_archive
    from latentlab.hidden.prompts import Place, require_apart, require_replaceable

    out = Place("the output", output_location(args.out), advice="choose another output path")
    inputs = [Place("store", args.store, "to export"), Place("--table", args.table, "file")]
    inputs.append(Place("--transitions", args.transitions, "store"))
    require_apart([out], [source for source in inputs if source.path is not None])
    require_replaceable(out, is_npz_archive, ARCHIVE)

    keys = export_npz(args.store, args.out, args.table, args.layer, args.transitions)
    print(f"{args.out}: {', '.join(keys)}")


def npz_import(args: argparse.Namespace) -> None:
    from latentlab.hidden.npz import import_npz
    from latentlab.hidden.prompts import Place

    require_safe_outputs(
        Place("the store", output_location(args.store), advice="choose another store path"),
        Place("--table", output_location(args.table)) if args.table else None,
        [Place("the .npz file", args.npz)],
        work=False,
    )

    rows = import_npz(args.npz, args.store, args.table, args.layer)
    print(f"{args.store}: {rows} rows imported from {args.npz}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="latentlab", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)

    serve_parser = commands.add_parser("serve", help="HTTP API: pooled hidden states of prompts")
    serve.add_arguments(serve_parser)
    serve_parser.set_defaults(run=serve.run)

    lab = commands.add_parser("label", help="hidden states of a model over your prompts -> a store (the label stage)")
    lab.add_argument("--model", required=True, help="a Hugging Face model directory or hub id (e.g. models/base)")
    lab.add_argument("--prompts", required=True, help="Parquet, JSON Lines (.jsonl) or plain text (one prompt a line)")
    lab.add_argument("--out", required=True, help="the Zarr store to write (e.g. hidden/mine.zarr)")
    lab.add_argument("--column", default="prompt", help="the Parquet column or JSON field with the prompts")
    lab.add_argument("--table", help="the row table (Parquet) with the generated text; default: beside --out")
    lab.add_argument(
        "--layers", type=int, nargs="+", default=[-1], help="output_hidden_states indices (-1: final norm)"
    )
    lab.add_argument("--tokens", type=int, default=1, help="1: pool over the prompt; N > 1: generate N, pool over them")
    lab.add_argument("--temperature", type=float, default=1.0)
    lab.add_argument("--top-p", type=float, default=1.0)
    lab.add_argument("--store-tokens", action="store_true", help="also every pooled position: tokens (N, T, L, H)")
    add_pooling_argument(lab)
    add_prompt_arguments(lab)
    lab.add_argument(
        "--no-stop-at-eos",
        dest="stop_at_eos",
        action="store_false",
        help="generate exactly --tokens tokens for every row, end-of-sequence stops none (fixed length)",
    )
    lab.add_argument("--compression", default="zstd", choices=["none", "lz4", "zstd"], help="codec of the float arrays")
    lab.add_argument("--batch-size", type=int, default=256)
    lab.add_argument("--shard-rows", type=int, help="rows per shard file, the unit a rerun resumes (default: ~1024)")
    lab.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    lab.add_argument("--device", default="auto")
    lab.add_argument("--seed", type=int, default=0)
    lab.set_defaults(run=label_command)

    inf = commands.add_parser("info", help="what a hidden-state store holds")
    inf.add_argument("store")
    inf.add_argument("--json", action="store_true", help="machine-readable")
    inf.add_argument(
        "--verify", action="store_true", help="read back every chunk of every array; exit 1 naming the first damaged"
    )
    inf.set_defaults(run=info_command)

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
    add_pooling_argument(ex)
    ex.add_argument("--compression", default="zstd", choices=["none", "lz4", "zstd"], help="codec of the float arrays")
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
        if os.environ.get("LATENTLAB_DEBUG"):
            raise
        print(
            "error: "
            + "; ".join(f"--{'.'.join(map(str, e['loc'])).replace('_', '-')}: {e['msg']}" for e in error.errors()),
            file=sys.stderr,
        )
        sys.exit(2)
    except Exception as error:  # the one error boundary: one line naming the file or option, no traceback
        if os.environ.get("LATENTLAB_DEBUG"):
            raise
        code, line = describe_failure(error)
        print(f"error: {line}  (LATENTLAB_DEBUG=1 shows the traceback)", file=sys.stderr)
        sys.exit(code)


if __name__ == "__main__":
    main()
