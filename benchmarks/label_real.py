"""Labelling at the real vocabulary and width: `label` vs the reference on a Qwen2-shaped model. Prints JSON.

    PYTHONPATH=. python benchmarks/label_real.py           # about 5-6 minutes on a 2-core CPU
    PYTHONPATH=. python benchmarks/label_real.py --quick   # a smoke run (the family's tiny width, few rows)

The JSON also goes to results/label-real-benchmark.json (--out elsewhere; a --quick run writes no file).

benchmarks/label.py's comparison (its machinery, imported: fresh forked processes per run, a one-batch
warm-up in each, interleaved rounds with the order rotated, best times and paired medians) on another
model: tests/families.py's `qwen2` (the real Qwen tokenizer, the real padded 151,936-row vocabulary, 14
query / 2 key-value heads, qkv bias, tied embeddings, random weights) at Qwen2.5-0.5B's width (hidden 896,
MLP 4,864) with 4 layers (label.py's build_qwen2). The prompts are the default DAG's arithmetic prompts
(label.py's benchmark_prompts); the last layer (-1) is kept; one torch thread.
  reference  label.py's: `model.generate(output_hidden_states=True, return_dict_in_generate=True)`, the
             last layer of every generated token kept in memory, `np.savez` at the end; prompt mode one
             forward with `output_hidden_states=True` (which computes the 151,936-way logits at every prompt
             position, as that call does), every prompt position kept. It keeps the per-token states and
             does not average them (a mean over 8 positions is microseconds beside the forward passes)
  label      the `label` stage's path with its default `store_tokens: true` (pooled vectors and per-token
             float16 states in a sharded Zarr store): the goal, label / reference in rows/s >= 1 per cell
  bare       our sampler / forward pass alone, nothing extracted or written: where `label`'s time goes
Cells: prompt mode (tokens 1) and generate mode (tokens --tokens, fixed length: `stop_at_eos: false`, the
reference's setting; with random weights an end-of-sequence is all but never drawn, so stopping at EOS
would be the same work). Memory: each approach's peak RSS over its RSS once loaded and warmed up (from
the cells), and `label`'s at 1x and 4x --memory-rows in prompt mode (batch and shards as the prompt cell),
one fresh process each: flat in rows is the goal, met when the peak grows by under half of what holding the
extra rows' results (float16 per-token states and the float32 pooled vector) would take. Peaks of repeated
identical runs differ by up to 20-40 MB here (the allocator's arenas and kept heap), so the few-MB results
of a few hundred rows cannot show it; 2,048 against 8,192 rows (about 84 MB of results apart) can.
"""

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.label import (  # noqa: E402
    add_qwen2_arguments,
    build_qwen2,
    compare,
    emit,
    import_for_children,
    in_fresh_process,
    memory_growth,
    qwen2_shape,
)

RESULT = ROOT / "results" / "label-real-benchmark.json"
APPROACHES = ("reference", "label", "bare")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_qwen2_arguments(parser)
    parser.add_argument("--prompt-rows", type=int, default=256)
    parser.add_argument("--prompt-batch", type=int, default=64)
    parser.add_argument("--generate-rows", type=int, default=64)
    parser.add_argument("--generate-batch", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=8, help="tokens generated in generate mode (params.yaml: 8)")
    parser.add_argument("--memory-rows", type=int, default=2048, help="label's peak at multiples of these rows")
    parser.add_argument("--memory-multiples", type=int, nargs="+", default=[1, 4], help="x --memory-rows")
    parser.add_argument("--compression", default="zstd", choices=["none", "lz4", "zstd"], help="label's codec")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="a smoke run: the family's tiny width, few rows")
    parser.add_argument("--out", default=None, help=f"also write the JSON here (default: {RESULT}; --quick: none)")
    args = parser.parse_args()
    if args.quick:
        args.hidden, args.intermediate, args.layers, args.tokens, args.repeats = 56, 64, 2, 2, 1
        args.prompt_rows, args.prompt_batch, args.generate_rows, args.generate_batch = 16, 8, 8, 4
        args.memory_rows = 32
    out = Path(args.out) if args.out else (None if args.quick else RESULT)
    os.environ["OMP_NUM_THREADS"] = str(args.threads)  # before torch starts: the children inherit it
    import_for_children("qwen2")
    import torch

    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        print(f"building the Qwen2-shaped model (hidden {args.hidden}, {args.layers} layers)", file=sys.stderr)
        model = in_fresh_process(build_qwen2, Path(tmp) / "qwen2", args.hidden, args.layers, args.intermediate)
        cells = {
            "prompt (tokens 1)": (
                {"model": model, "tokens": 1, "stop_at_eos": True, "batch_size": args.prompt_batch},
                args.prompt_rows,
            ),
            f"generate (tokens {args.tokens}, fixed length)": (
                {"model": model, "tokens": args.tokens, "stop_at_eos": False, "batch_size": args.generate_batch},
                args.generate_rows,
            ),
        }
        results = {}
        for name, (cell, rows) in cells.items():
            print(f"{name}: {rows} rows, {args.repeats} rounds of {', '.join(APPROACHES)}", file=sys.stderr)
            results[name] = compare(cell, rows, args, APPROACHES)
        prompt = cells["prompt (tokens 1)"][0]
        sizes = [m * args.memory_rows for m in args.memory_multiples]
        print(f"memory: label at {sizes} rows, prompt mode", file=sys.stderr)
        growth = memory_growth(prompt, sizes, args, ("label",))["label"]
        shape = qwen2_shape(model)
    goals = {
        name: {
            "goal": "label / reference rows/s >= 1.0",
            "label_rows_per_s": r["label"]["rows_per_s"],
            "reference_rows_per_s": r["reference"]["rows_per_s"],
            "best": r["b_over_a"]["best"],
            "paired_median": r["b_over_a"]["paired_median"],
            "goal_met": r["b_over_a"]["best"] >= 1.0,
        }
        for name, r in results.items()
    }
    # what holding the extra rows' results would take: float16 per-token states (the reference's float32 states
    # of the prompt cell, halved) and the float32 pooled vector, per row
    prompt_cell = results["prompt (tokens 1)"]
    row_bytes = prompt_cell["reference"]["hidden_state_bytes"] / prompt_cell["rows"] / 2 + 4 * shape["hidden_size"]
    holding_mb = (sizes[-1] - sizes[0]) * row_bytes / 2**20
    peaks = [growth[n]["peak_over_loaded_mb"] for n in sizes]
    goals["label_memory_flat_in_rows"] = {
        "goal": f"label's peak grows from {sizes[0]} to {sizes[-1]} rows (prompt mode) by under half of what holding "
        "the extra rows' results would take",
        "peak_over_loaded_mb": dict(zip(sizes, peaks)),
        "growth_mb": round(peaks[-1] - peaks[0], 1),
        "holding_extra_rows_mb": round(holding_mb, 1),
        "goal_met": peaks[-1] - peaks[0] < holding_mb / 2,
    }
    report = {
        "benchmark": "label_real_vocab",
        "settings": {
            "model": shape,
            "prompts": "the default DAG's arithmetic prompts (benchmarks/label.py benchmark_prompts)",
            "layers_kept": [-1],
            "store_tokens": True,
            "compression": args.compression,
            "tokens": args.tokens,
            "rows": {name: rows for name, (_, rows) in cells.items()},
            "batch_size": {name: cell["batch_size"] for name, (cell, _) in cells.items()},
            "shard_rows": "4 x batch_size",
            "repeats": args.repeats,
            "threads": args.threads,
            "torch": torch.__version__,
            "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        },
        "results": results,
        "memory_growth, label, prompt": growth,
        "goals": goals,
        "wall_s": round(time.perf_counter() - started, 1),
    }
    emit(report, out)


if __name__ == "__main__":
    main()
