"""`latentlab label` against the label stage's function, and StoreDataset through a DataLoader.

    LATENTLAB_THREADS=1 python benchmarks/label_cli.py            # JSON on stdout, about a minute on 2 cores
    LATENTLAB_THREADS=1 python benchmarks/label_cli.py --quick    # a smoke run

label: the same rows (the default DAG's training prompts, repeated to `--rows`) and the DAG's
label settings (layers 2 and -1, 8 generated tokens, per-token states, batches of 256) on a random
model of the default DAG's size, labelled `--repeats` times each way, interleaved, in this process:
  cli    `latentlab label --prompts rows.txt ...` (reads the text file, then the shared run)
  stage  `label_sets(...)`, the function the label stage calls, on the rows as a DataFrame
Both include loading the model (each call loads it, as each command does). They are the same code,
so the rows/s should agree within noise; the best and the median of the repeats are reported.

dataloader: epochs of the resulting store through `DataLoader(StoreDataset(...), batch_size=None,
num_workers=W, persistent_workers=W > 0)` with W = 0 and 2, batches of 256 samples, shuffled by
chunk, for `pooled` (one sample a row) and `tokens` (one sample a generated token): samples/s of the
first epoch (workers' start-up included) and the best of `--repeats` later ones (steady).
"""

import argparse
import contextlib
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
OPTIONS = ["--layers", "2", "-1", "--tokens", "8", "--store-tokens", "--batch-size", "256", "--shard-rows", "1024"]


def build_model(directory: Path) -> Path:
    """A random model of the default DAG's size (params.yaml `model`: H=64, 4 blocks, 4 heads, 64 positions)."""
    from latentlab.lm.modeling import TinyLMConfig, build_tiny_lm, save_lm
    from latentlab.lm.tokenizer import build_char_tokenizer

    tokenizer = build_char_tokenizer()
    cfg = TinyLMConfig(hidden_size=64, layers=4, heads=4, intermediate_size=256, max_positions=64)
    save_lm(build_tiny_lm(cfg, tokenizer), tokenizer, directory, source="scratch")
    return directory


def label_rows(rows: int) -> list[str]:
    """The default DAG's training prompts, repeated as needed."""
    from latentlab.tasks.arithmetic import ArithmeticConfig, make_splits

    pool = make_splits(ArithmeticConfig(), 0)["full"]["prompt"].to_list()
    return [pool[i % len(pool)] for i in range(rows)]


def timed(run) -> float:
    started = time.perf_counter()
    run()
    return time.perf_counter() - started


def compare_label(model: Path, prompts: list[str], work: Path, repeats: int) -> dict:
    import polars as pl
    import zarr

    from latentlab.cli import main as cli
    from latentlab.common.runtime import resolve_device, seed_everything
    from latentlab.hidden.labelling import LabelConfig, LabelSet, label_sets

    (work / "rows.txt").write_text("\n".join(prompts))
    rows = pl.DataFrame({"id": range(len(prompts)), "prompt": prompts}, schema={"id": pl.Int64, "prompt": pl.String})
    cfg = LabelConfig(layers=[2, -1], tokens=8, store_tokens=True, batch_size=256, shard_rows=1024)

    def by_stage() -> None:
        seed_everything(0)
        target = LabelSet("rows", rows, work / "stage" / "rows.zarr", work / "stage" / "rows.parquet", work / "st.work")
        label_sets(model, [target], cfg, 0, resolve_device("cpu"), None)

    def by_cli() -> None:
        with contextlib.redirect_stdout(sys.stderr):  # stdout is the JSON report's
            cli(
                ["label", "--model", str(model), "--prompts", str(work / "rows.txt")]
                + ["--out", str(work / "cli" / "rows.zarr"), "--device", "cpu", *OPTIONS]
            )

    runs = {"cli": by_cli, "stage": by_stage}
    seconds = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            seconds[name].append(timed(run))
    result = {
        name: {
            "rows_per_s_best": round(len(prompts) / min(times), 1),
            "rows_per_s_median": round(len(prompts) / statistics.median(times), 1),
            "seconds": [round(t, 3) for t in times],
        }
        for name, times in seconds.items()
    }
    result["cli_over_stage_best"] = round(result["cli"]["rows_per_s_best"] / result["stage"]["rows_per_s_best"], 3)
    same = all(
        (zarr.open_group(work / "cli" / "rows.zarr")[a][:] == zarr.open_group(work / "stage" / "rows.zarr")[a][:]).all()
        for a in ("pooled", "tokens", "n_positions")
    )
    result["identical_arrays"] = bool(same)
    return result


def dataloader_speed(store: Path, repeats: int) -> dict:
    from torch.utils.data import DataLoader

    from latentlab.hidden.dataset import StoreDataset

    result = {}
    for kind in ("pooled", "tokens"):
        data = StoreDataset(store, kind=kind, batch_size=256, seed=0)
        for workers in (0, 2):
            loader = DataLoader(data, batch_size=None, num_workers=workers, persistent_workers=workers > 0)
            times = []
            for epoch in range(repeats + 1):  # epoch 0 starts the workers; the later ones reuse them
                data.set_epoch(epoch)
                started, seen = time.perf_counter(), 0
                for batch in loader:
                    seen += len(batch["x"])
                times.append(time.perf_counter() - started)
                assert seen == len(data)
            result[f"{kind}_workers_{workers}"] = {
                "samples": len(data),
                "samples_per_s_first_epoch": round(len(data) / times[0], 1),
                "samples_per_s_steady": round(len(data) / min(times[1:]), 1),
            }
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="512 rows, 1 repeat")
    args = parser.parse_args()
    if args.quick:
        args.rows, args.repeats = 512, 1
    os.environ.setdefault("LATENTLAB_THREADS", "1")
    import torch

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model = build_model(work / "model")
        label = compare_label(model, label_rows(args.rows), work, args.repeats)
        loader = dataloader_speed(work / "cli" / "rows.zarr", args.repeats)
    report = {
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count()},
        "threads": torch.get_num_threads(),
        "rows": args.rows,
        "repeats": args.repeats,
        "label_settings": " ".join(OPTIONS) + " (random model of the DAG's size: H=64, 4 blocks)",
        "label": label,
        "dataloader": loader,
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
