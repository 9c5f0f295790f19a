"""Labelling speed, memory and bytes: the reference approach, the `label` stage, and bare generation.

    python benchmarks/label.py            # JSON on stdout, about 8 minutes on a 2-core CPU
    python benchmarks/label.py --quick    # a smoke run
    python benchmarks/label.py --grouping-only   # what grouping rows by length buys, about a minute
    python benchmarks/label.py --memory-only     # peak memory at 1x, 4x, 16x the rows, about 2 minutes
                                                 # (--memory-multiples 1 4 16 64: also 64x, about 6 minutes)
    python benchmarks/label.py --heap-only       # what keeping freed memory buys `label`, about a minute
    python benchmarks/label.py --phases-only     # where `label`'s time goes in prompt mode, phase by phase, 30 s

Three approaches on the same model, prompts and machine, each in a fresh process forked from a
parent that has imported everything but computed nothing (so no start-up cost is timed and no
thread pool is forked), so its peak memory is its own: peak RSS, and its growth over the RSS once
the model is loaded.
  reference  `generate(output_hidden_states=True, return_dict_in_generate=True)` (every layer at every
             step), the last layer of every token kept in memory, `np.savez` at the end; in prompt
             mode one forward pass with `output_hidden_states=True`, every prompt position kept
  label      the `label` stage's path (latentlab.hidden.labelling): hooks on the chosen layer, pooled sums
             on the fly, sharded Zarr written shard by shard; `label` stores per-token float16 states
             too (as the reference keeps them), `label_pooled` only the pooled vectors
  bare       the same sampler / forward pass with no extraction and nothing written: the ceiling
for prompt mode (`tokens 1`) and generate mode (`tokens N`) with both stopping rules (stop at
end-of-sequence; fixed length, every row exactly N tokens, the reference's 256-token setting), on
the default-sized model (H 64, 4 layers), a deep one (24 layers) and a wide one (H 512, 8 layers,
64 tokens, fixed length only: the reference keeps every layer of every step, which at this width
costs what it costs on real models), and at twice the rows for memory. Ratios are speed ratios
(rows/s): b/a = label vs reference, b/c = label vs bare. Each approach runs `--repeats` times,
interleaved with the others; the best time and the largest peak are reported, each ratio both of
the best times and as the median of the ratios within a round. Also measured: each
codec's write time and bytes on label's own arrays, what reading layers costs in one forward
pass (hooks on the kept layer vs `output_hidden_states=True`), what grouping rows by length (as
`label` batches them) buys the bare path (`--grouping-only` prints just that), and what keeping freed
memory (latentlab.common.heap.keep_freed_memory) buys `label` (`--heap-only`), and in prompt mode where
`label`'s time goes beyond the forward pass it shares with the reference (`--phases-only`). Every child freezes its
heap and keeps freed memory as `label` does, so the approaches differ in their algorithms, not in how
the process hands pages back; each child's minor page faults in its timed run are reported.
Threads default to 1: on a shared machine two OpenMP threads that wait on each other are slower.
"""

import argparse
import json
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

APPROACHES = ("reference", "label", "label_pooled", "bare")


def directory_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.is_dir() else path.stat().st_size


def rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def benchmark_prompts(rows: int) -> list[str]:
    """The default DAG's training prompts, repeated as needed."""
    from latentlab.tasks.arithmetic import ArithmeticConfig, make_splits

    pool = make_splits(ArithmeticConfig(), 0)["full"]["prompt"].to_list()
    return [pool[i % len(pool)] for i in range(rows)]


# ---- the three approaches (run inside a child process) ------------------------------------------


def run_reference(model, tokenizer, prompts, tokens, stop, batch_size, out: Path) -> dict:
    import numpy as np
    import torch

    kept, texts = [], []  # every batch's last-layer states, held until the end as the reference does
    with torch.no_grad():
        for start in range(0, len(prompts), batch_size):
            enc = tokenizer(
                prompts[start : start + batch_size], return_tensors="pt", padding=True, add_special_tokens=False
            )
            if tokens == 1:
                kept.append(model(**enc, output_hidden_states=True).hidden_states[-1].numpy())
                continue
            result = model.generate(
                **enc,
                max_new_tokens=tokens,
                do_sample=True,
                temperature=1.0,
                top_k=0,
                top_p=1.0,
                output_hidden_states=True,
                return_dict_in_generate=True,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id if stop else None,  # None: exactly `tokens` for every row
            )
            states = torch.stack([step[-1][:, -1] for step in result.hidden_states], 1)  # (B, steps, H)
            padded = torch.zeros((states.shape[0], tokens, states.shape[2]))
            padded[:, : states.shape[1]] = states
            kept.append(padded.numpy())
            texts += tokenizer.batch_decode(result.sequences[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    width = max(k.shape[1] for k in kept)
    hidden = np.concatenate([np.pad(k, ((0, 0), (0, width - k.shape[1]), (0, 0))) for k in kept])
    np.savez(out / "reference.npz", hidden_state=hidden, text_generated=np.array(texts or [""] * len(prompts)))
    return {"bytes": directory_bytes(out / "reference.npz"), "hidden_state_bytes": hidden.nbytes}


def run_label(model, tokenizer, prompts, tokens, stop, batch_size, out: Path, store_tokens: bool, compression) -> dict:
    import polars as pl

    from latentlab.hidden.extract import Extractor
    from latentlab.hidden.labelling import LabelConfig, label, prepare

    cfg = LabelConfig(
        layers=[-1],
        tokens=tokens,
        stop_at_eos=stop,
        store_tokens=store_tokens,
        batch_size=batch_size,
        shard_rows=4 * batch_size,
        compression=compression,
    )
    rows = pl.DataFrame({"id": list(range(len(prompts))), "prompt": prompts})
    extractor = Extractor(model, tokenizer, cfg)
    job = prepare(extractor, "bench", rows, cfg, 0, {"source": "benchmark"})
    label(extractor, job, out / "bench.zarr", out / "bench.parquet", out / "work")
    tokens_array = out / "bench.zarr" / "tokens"
    return {
        "bytes": directory_bytes(out / "bench.zarr"),
        "tokens_array_bytes": directory_bytes(tokens_array) if tokens_array.exists() else 0,
    }


def run_bare(model, tokenizer, prompts, tokens, stop, batch_size, out: Path) -> dict:
    import torch

    from latentlab.hidden.extract import TokenRows
    from latentlab.lm.sampling import SamplingConfig, positions_from_mask, sample
    from latentlab.lm.tokenizer import token_ids

    sampling = SamplingConfig(max_new_tokens=tokens, stop_at_eos=stop)
    encoded = TokenRows.from_lists(token_ids(tokenizer, prompts))  # once, as label does
    with torch.no_grad():
        for start in range(0, len(prompts), batch_size):
            ids, mask = encoded[start : start + batch_size].padded(tokenizer.pad_token_id, "cpu", left=True)
            if tokens == 1:
                model(
                    input_ids=ids,
                    attention_mask=mask,
                    position_ids=positions_from_mask(mask),
                    use_cache=False,
                    logits_to_keep=1,
                )
            else:
                sample(
                    model,
                    model.get_input_embeddings()(ids),
                    mask,
                    sampling,
                    tokenizer.eos_token_id,
                    tokenizer.pad_token_id,
                    torch.Generator().manual_seed(start),
                )
    return {"bytes": 0}


def runner(approach: str, args):
    """The function that runs `approach` (APPROACHES): (model, tokenizer, prompts, tokens, stop, batch_size, out)."""
    return {
        "reference": run_reference,
        "bare": run_bare,
        "label": lambda *a: run_label(*a, store_tokens=True, compression=args.compression),
        "label_pooled": lambda *a: run_label(*a, store_tokens=False, compression=args.compression),
    }[approach]


def load_frozen(model_dir, args):
    """The model at `args.threads` torch threads, the heap frozen once it is loaded, as `label` freezes it: no full
    collection walks the model's objects."""
    import torch

    from latentlab.common.heap import freeze_heap
    from latentlab.lm.modeling import load_lm

    torch.set_num_threads(args.threads)
    model, tokenizer = load_lm(model_dir)
    freeze_heap()
    return model, tokenizer


def child(approach: str, cell: dict, rows: int, args) -> dict:
    """One timed run of one approach (after a one-batch warm-up), in a process of its own."""
    import torch

    from latentlab.common.heap import keep_freed_memory
    from latentlab.hidden import labelling

    torch.manual_seed(0)
    model, tokenizer = load_frozen(cell["model"], args)  # as `label` does, for every approach
    if cell.get("heap", "kept") == "kept":  # as `label` does, for every approach: batches reuse freed pages
        keep_freed_memory()
    else:  # glibc's default heap, for `label` too (heap_gain)
        labelling.keep_freed_memory = lambda: False
    prompts = benchmark_prompts(rows)
    run = runner(approach, args)
    tokens, stop, batch_size = cell["tokens"], cell["stop_at_eos"], cell["batch_size"]
    # one whole batch: every code path once, at the timed run's shapes. After only a few rows our sampler's first
    # full batches ran cold (the reference ahead by 6% paired; 2% behind after a 512-row warm-up, default model)
    with tempfile.TemporaryDirectory() as warm_up:
        run(model, tokenizer, prompts[:batch_size], tokens, stop, batch_size, Path(warm_up))
    loaded = rss_bytes()
    with tempfile.TemporaryDirectory() as out:
        faults, started = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, time.perf_counter()
        sizes = run(model, tokenizer, prompts, tokens, stop, batch_size, Path(out))
        seconds, faults = time.perf_counter() - started, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {
        "seconds": seconds,
        "minor_page_faults": faults,
        "peak_rss_mb": peak / 2**20,
        "peak_over_loaded_mb": (peak - loaded) / 2**20,
        **sizes,
    }


def in_fresh_process(function, *args):
    """`function(*args)` in a forked child; its JSON-able result comes back through a pipe. The
    parent must never have computed anything with a thread pool (torch, polars): a forked pool
    deadlocks the child."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child
        os.close(read)
        try:
            result, code = {"ok": function(*args)}, 0
        except BaseException as error:  # report it to the parent, never fall back into its code
            result, code = {"error": f"{type(error).__name__}: {error}"}, 1
        with os.fdopen(write, "w") as pipe:
            json.dump(result, pipe)
        os._exit(code)
    os.close(write)
    with os.fdopen(read) as pipe:
        answer = json.loads(pipe.read() or '{"error": "the child died"}')
    os.waitpid(pid, 0)
    if "error" in answer:
        raise RuntimeError(f"{function.__name__}{args[:4]} failed: {answer['error']}")
    return answer["ok"]


# ---- the comparison (the parent process) --------------------------------------------------------


def speedup(slow: list[float], fast: list[float], digits: int) -> tuple[float, float]:
    """How many times faster `fast` ran than `slow` (seconds, round by round): of the best times, and the median
    of the ratios within a round (two runs minutes apart never pair)."""
    paired = statistics.median(s / f for s, f in zip(slow, fast, strict=True))
    return round(min(slow) / min(fast), digits), round(paired, digits)


def build_model(directory: Path, hidden: int, layers: int) -> str:
    """A random model: the default DAG's size is H=64 (4 heads, MLP 4H); wider ones get heads of 64."""
    from latentlab.lm.modeling import TinyLMConfig, build_tiny_lm, save_lm
    from latentlab.lm.tokenizer import build_char_tokenizer

    tokenizer = build_char_tokenizer()
    heads = max(4, hidden // 64)
    cfg = TinyLMConfig(hidden_size=hidden, layers=layers, heads=heads, intermediate_size=4 * hidden, max_positions=128)
    return save_lm(build_tiny_lm(cfg, tokenizer), tokenizer, directory, source="scratch")


def build_qwen2(directory: Path, hidden: int, layers: int, intermediate: int) -> str:
    """A random Qwen2-shaped checkpoint in `directory`: tests/families.py's `qwen2` (the real Qwen tokenizer and
    padded 151,936-row vocabulary, 14 query / 2 key-value heads, qkv bias, tied embeddings, the real eos ids) at
    `hidden` width, `layers` layers and an MLP of `intermediate` (Qwen2.5-0.5B: 896, 24, 4864)."""
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    from tests.families import build_family, config

    build_family("qwen2", directory)  # the tokenizer files and generation_config.json; its tiny weights replaced
    family = config("qwen2")
    shape = {"hidden_size": hidden, "num_hidden_layers": layers, "intermediate_size": intermediate}
    # rebuilt, not edited: the config derives per-layer fields (layer_types) from the layer count when built
    cfg = type(family).from_dict({k: v for k, v in family.to_dict().items() if k != "layer_types"} | shape)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg)
    model.generation_config = GenerationConfig.from_pretrained(directory)
    model.save_pretrained(directory)
    return str(directory)


def add_qwen2_arguments(parser) -> None:
    """--hidden, --intermediate, --layers: build_qwen2's shape (defaults: Qwen2.5-0.5B's width, 4 layers)."""
    parser.add_argument("--hidden", type=int, default=896, help="width (Qwen2.5-0.5B: 896; a multiple of 14)")
    parser.add_argument("--intermediate", type=int, default=4864, help="MLP width (Qwen2.5-0.5B: 4864)")
    parser.add_argument("--layers", type=int, default=4, help="decoder layers (Qwen2.5-0.5B: 24)")


def qwen2_shape(directory: str) -> dict:
    """What a build_qwen2 checkpoint is, for a benchmark's JSON."""
    from transformers import AutoConfig

    shape = AutoConfig.from_pretrained(directory)
    return {
        "family": "qwen2 (tests/families.py, random weights; Qwen2.5-0.5B is hidden 896, MLP 4864, 24 layers)",
        "hidden_size": shape.hidden_size,
        "intermediate_size": shape.intermediate_size,
        "layers": shape.num_hidden_layers,
        "heads": shape.num_attention_heads,
        "kv_heads": shape.num_key_value_heads,
        "vocab_size": shape.vocab_size,
        "tied_embeddings": shape.tie_word_embeddings,
    }


def emit(report: dict, out: Path | None) -> None:
    """The report as JSON on stdout, and also in the file `out` (the committed results/*.json) unless None."""
    text = json.dumps(report, indent=2)
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text + "\n")
    print(text)


def compare(cell: dict, rows: int, args, approaches: tuple[str, ...] = APPROACHES) -> dict:
    """Every approach `repeats` times, interleaved, the order rotated each round (a, b, b', c; b, b',
    c, a; ...) so that a noisy neighbour slows them alike and none always runs first. Reported: the
    best time and the largest peak of each, and each ratio twice: of the best times, and the median
    over rounds of the ratio within a round (the two runs minutes apart never pair). `approaches`: a
    subset of APPROACHES (the ratios and byte ratios of the ones present)."""
    runs = {approach: [] for approach in approaches}
    for round_ in range(args.repeats):
        shift = round_ % len(approaches)
        for approach in approaches[shift:] + approaches[:shift]:
            runs[approach].append(in_fresh_process(child, approach, cell, rows, args))
    summary = {}
    for approach, results in runs.items():
        seconds = min(r["seconds"] for r in results)
        summary[approach] = {
            "seconds": round(seconds, 3),
            "rows_per_s": round(rows / seconds, 1),
            "peak_over_loaded_mb": round(max(r["peak_over_loaded_mb"] for r in results), 1),
            "minor_page_faults_median": statistics.median(r["minor_page_faults"] for r in results),
            **{k: v for k, v in results[0].items() if k.endswith("bytes")},
        }

    def ratios(x: str, y: str) -> dict:  # speed of x over speed of y
        best, paired = speedup([r["seconds"] for r in runs[y]], [r["seconds"] for r in runs[x]], 2)
        return {"best": best, "paired_median": paired}

    pairs = {
        "b_over_a": ("label", "reference"),
        "b_over_c": ("label", "bare"),
        "b_pooled_over_a": ("label_pooled", "reference"),
        "b_pooled_over_c": ("label_pooled", "bare"),
    }
    sizes = {}  # the whole store (pooled float32 included) and the pooled-only store
    if "reference" in summary:
        npz = summary["reference"]["bytes"]
        if "label" in summary:
            sizes["store_with_tokens"] = round(summary["label"]["bytes"] / npz, 3)
        if "label_pooled" in summary:
            sizes["store_pooled_only"] = round(summary["label_pooled"]["bytes"] / npz, 4)
    return {
        "rows": rows,
        **summary,
        **{name: ratios(x, y) for name, (x, y) in pairs.items() if x in runs and y in runs},
        "bytes_over_npz": sizes,
    }


def measure_codecs(cell: dict, rows: int, args) -> dict:
    """Write time and bytes of each codec on one label run's own arrays (pooled float32, tokens
    float16), written as `label` writes them (shard by shard, batch-row chunks), best of `repeats`."""
    import numpy as np
    import zarr

    from latentlab.hidden.store import COMPRESSORS, store_metadata, write_store

    with tempfile.TemporaryDirectory() as tmp:
        in_fresh_process(child_label_once, cell, rows, Path(tmp) / "source", args)
        source = zarr.open_group(Path(tmp) / "source" / "bench.zarr", mode="r")
        pooled, tokens = source["pooled"][:], source["tokens"][:]
        batch, shard = cell["batch_size"], 4 * cell["batch_size"]
        result = {"arrays": {"pooled": list(pooled.shape), "tokens": list(tokens.shape)}}
        result["zero_share_of_tokens"] = round(float((tokens == 0).mean()), 3)
        for name in COMPRESSORS:
            seconds = []
            for repeat in range(args.repeats):
                path = Path(tmp) / f"{name}-{repeat}.zarr"
                nodes = store_metadata(len(pooled), 1, pooled.shape[-1], tokens.shape[1], {}, batch, shard, name)
                group = write_store(path, nodes)[""]
                started = time.perf_counter()
                for lo in range(0, len(pooled), shard):
                    group["pooled"][lo : lo + shard] = pooled[lo : lo + shard]
                    group["tokens"][lo : lo + shard] = tokens[lo : lo + shard]
                seconds.append(time.perf_counter() - started)
                assert np.array_equal(zarr.open_group(path, mode="r")["tokens"][:], tokens)
            result[name] = {
                "write_s": round(min(seconds), 4),
                "mb_per_s": round((pooled.nbytes + tokens.nbytes) / min(seconds) / 2**20, 1),
                "bytes_over_raw": round(directory_bytes(path) / (pooled.nbytes + tokens.nbytes), 3),
            }
    return result


def child_label_once(cell: dict, rows: int, out: Path, args) -> None:
    """One uncompressed label run with per-token states: the arrays the codecs are measured on."""
    import torch

    from latentlab.lm.modeling import load_lm

    torch.set_num_threads(args.threads)
    model, tokenizer = load_lm(cell["model"])
    out.mkdir()
    run_label(
        model,
        tokenizer,
        benchmark_prompts(rows),
        cell["tokens"],
        cell["stop_at_eos"],
        cell["batch_size"],
        out,
        store_tokens=True,
        compression="none",
    )


def hooks_vs_hidden_states(model: str, rows: int, args) -> dict:
    """One prompt-mode forward pass: bare, with LayerCapture on the last layer, and with
    `output_hidden_states=True` (every layer), interleaved, best of 5: what each way of reading costs."""
    import torch

    from latentlab.lm.capture import LayerCapture
    from latentlab.lm.modeling import load_lm
    from latentlab.lm.sampling import positions_from_mask

    torch.set_num_threads(args.threads)
    model, tokenizer = load_lm(model)
    enc = tokenizer(benchmark_prompts(rows), return_tensors="pt", padding=True, add_special_tokens=False)
    inputs = {**enc, "position_ids": positions_from_mask(enc["attention_mask"]), "use_cache": False}
    times = {"bare": [], "hooks": [], "output_hidden_states": []}
    with torch.no_grad():
        for _ in range(6):
            for way in times:
                started = time.perf_counter()
                if way == "hooks":
                    with LayerCapture(model, [-1]) as capture:
                        model(**inputs, logits_to_keep=1)
                        capture.stacked()
                else:
                    model(**inputs, logits_to_keep=1, output_hidden_states=way == "output_hidden_states")
                times[way].append(time.perf_counter() - started)
    best = {way: min(t[1:]) for way, t in times.items()}  # the first round warms up
    return {
        **{f"{way}_s": round(t, 4) for way, t in best.items()},
        "hooks_over_bare": round(best["hooks"] / best["bare"], 3),
        "output_hidden_states_over_bare": round(best["output_hidden_states"] / best["bare"], 3),
    }


def grouping_gain(model: str, rows: int, tokens: int, args) -> dict:
    """What grouping rows by length (as `label` batches them) buys the bare path: the same rows as given
    and sorted by prompt length, interleaved, in one process; best times and the median paired ratio."""
    import numpy as np

    from latentlab.hidden.extract import TokenRows
    from latentlab.lm.tokenizer import token_ids

    model, tokenizer = load_frozen(model, args)
    given = benchmark_prompts(rows)
    lengths = TokenRows.from_lists(token_ids(tokenizer, given)).lengths
    grouped = [given[i] for i in np.argsort(lengths, kind="stable")]  # as `label` orders a shard's rows
    result = {}
    for mode, (n, stop) in {
        "prompt": (1, True),
        "generate, stop at EOS": (tokens, True),
        "generate, fixed length": (tokens, False),
    }.items():
        times = {"given": [], "grouped": []}
        with tempfile.TemporaryDirectory() as out:
            run_bare(model, tokenizer, given[: args.batch_size], n, stop, args.batch_size, Path(out))  # warm-up
            for _ in range(args.repeats):
                for order, prompts in (("given", given), ("grouped", grouped)):
                    started = time.perf_counter()
                    run_bare(model, tokenizer, prompts, n, stop, args.batch_size, Path(out))
                    times[order].append(time.perf_counter() - started)
        best, paired = speedup(times["given"], times["grouped"], 3)
        result[mode] = {
            "given_s": round(min(times["given"]), 3),
            "grouped_s": round(min(times["grouped"]), 3),
            "speedup": best,
            "speedup_paired_median": paired,
        }
    return result


def heap_gain(cell: dict, rows: int, args) -> dict:
    """What `keep_freed_memory` buys `label`: the same cell with glibc's default heap and with freed memory
    kept, each in fresh processes, interleaved; the speedup (best and paired median) and each one's minor
    page faults in the timed run (median)."""
    runs = {"default": [], "kept": []}
    for round_ in range(args.repeats):
        for heap in ("default", "kept") if round_ % 2 == 0 else ("kept", "default"):
            runs[heap].append(in_fresh_process(child, "label", cell | {"heap": heap}, rows, args))
    seconds = {heap: [r["seconds"] for r in results] for heap, results in runs.items()}
    best, paired = speedup(seconds["default"], seconds["kept"], 3)
    return {
        **{f"{heap}_s": round(min(times), 3) for heap, times in seconds.items()},
        **{
            f"{heap}_minor_page_faults_median": statistics.median(r["minor_page_faults"] for r in results)
            for heap, results in runs.items()
        },
        "speedup": best,
        "speedup_paired_median": paired,
    }


def label_phases(cell: dict, rows: int, args) -> dict:
    """Where `label`'s time goes, against the reference and bare in the same process (interleaved, after a warm-up
    of each; one fresh process per cell), ms, median of `repeats` runs. `label`'s own functions are wrapped with
    timers: prepare (tokenize, check, fingerprint), create the store, the forward passes, pooling and copies (the
    rest of each batch, grouping rows by length and restoring their order), waiting for writes (what the writer
    thread's shard writes add to the main thread: mostly the last shard, which no compute can hide), finish (the
    row table, `complete`, the move into place) and the rest (building the config and row frame). Prompt mode only:
    there the forward pass is the reference's own, so what `label` adds is all in the other phases."""
    if cell["tokens"] != 1:
        raise ValueError("label_phases times prompt-mode cells (tokens 1)")
    from latentlab.common.heap import keep_freed_memory
    from latentlab.hidden import extract, labelling

    model, tokenizer = load_frozen(cell["model"], args)
    keep_freed_memory()
    spent: dict[str, float] = {}

    def timed(owner, name: str, phase: str) -> None:
        inner = getattr(owner, name)

        def wrapper(*a, **k):
            started = time.perf_counter()
            try:
                return inner(*a, **k)
            finally:
                spent[phase] = spent.get(phase, 0.0) + time.perf_counter() - started

        setattr(owner, name, wrapper)

    for owner, name, phase in (
        (labelling, "prepare", "prepare"),
        (labelling, "_start_or_resume", "create_store"),
        (labelling, "_label_shards", "shards"),
        (labelling, "_extract_shard", "extract"),
        (extract.Extractor, "_forward", "forward"),
        (labelling, "_finish", "finish"),
    ):
        timed(owner, name, phase)
    prompts = benchmark_prompts(rows)
    tokens, stop, batch_size = cell["tokens"], cell["stop_at_eos"], cell["batch_size"]
    run = {approach: runner(approach, args) for approach in ("reference", "label", "bare")}
    times: dict[str, list[dict]] = {approach: [] for approach in run}
    for round_ in range(args.repeats + 1):  # round 0 warms every path up
        for approach, function in run.items():
            spent.clear()
            with tempfile.TemporaryDirectory() as out:
                started = time.perf_counter()
                function(model, tokenizer, prompts, tokens, stop, batch_size, Path(out))
                total = time.perf_counter() - started
            if round_:
                times[approach].append({"total": total, **spent})
    label_runs = [
        {
            "prepare": t["prepare"],
            "create_store": t["create_store"],
            "forward": t["forward"],
            "pooling_and_copies": t["extract"] - t["forward"],
            "waiting_for_writes": t["shards"] - t["extract"],
            "finish": t["finish"],
            "rest": t["total"] - t["prepare"] - t["create_store"] - t["shards"] - t["finish"],
        }
        for t in times["label"]
    ]

    def ms(values) -> float:
        return round(statistics.median(values) * 1e3, 2)

    return {
        "rows": rows,
        **{f"{approach}_ms": ms(t["total"] for t in runs) for approach, runs in times.items()},
        "label_minus_reference_ms": ms(
            lab["total"] - ref["total"] for lab, ref in zip(times["label"], times["reference"])
        ),
        "label_phases_ms": {phase: ms(r[phase] for r in label_runs) for phase in label_runs[0]},
    }


def memory_growth(
    cell: dict, sizes: list[int], args, approaches: tuple[str, ...] = ("reference", "label", "bare")
) -> dict:
    """Peak RSS over the loaded model (MB) and seconds of one run of each of `approaches` at each row count, in
    fresh processes: `label` holds at most two shards, the reference everything."""
    return {
        approach: {
            rows: {k: round(r[k], 2) for k in ("peak_over_loaded_mb", "seconds")}
            for rows in sizes
            for r in [in_fresh_process(child, approach, cell, rows, args)]
        }
        for approach in approaches
    }


def import_for_children(*architectures: str) -> None:
    """Import here, compute only in children: what every child needs is loaded once, the transformers modeling
    module of each of `architectures` (e.g. "llama") too (lazy: each child would import it again)."""
    import importlib

    import polars  # noqa: F401
    import torch  # noqa: F401
    import transformers  # noqa: F401
    import transformers.generation.utils  # noqa: F401
    import zarr  # noqa: F401

    import latentlab.hidden.labelling  # noqa: F401
    import latentlab.lm.modeling  # noqa: F401

    for name in architectures:
        importlib.import_module(f"transformers.models.{name}.modeling_{name}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=2048)
    parser.add_argument("--tokens", type=int, default=8, help="tokens generated in generate mode (params.yaml: 8)")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--deep-layers", type=int, default=24)
    parser.add_argument("--wide", type=int, nargs=3, default=[512, 8, 64], help="hidden size, layers, tokens")
    parser.add_argument("--deep-rows", type=int, default=512)
    parser.add_argument("--wide-rows", type=int, default=16)
    parser.add_argument("--compression", default="zstd", choices=["none", "lz4", "zstd"], help="label's codec")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="a smoke run: small, one repeat")
    parser.add_argument("--grouping-only", action="store_true", help="only what grouping rows by length buys")
    parser.add_argument("--memory-only", action="store_true", help="only peak memory at each of --memory-multiples")
    parser.add_argument("--heap-only", action="store_true", help="only what keeping freed memory buys label")
    parser.add_argument("--phases-only", action="store_true", help="only where label's time goes in prompt mode")
    parser.add_argument(
        "--memory-multiples", type=int, nargs="+", default=[1, 4, 16], help="memory_growth's row counts, x --rows"
    )
    args = parser.parse_args()
    if args.quick:
        args.rows, args.tokens, args.batch_size, args.deep_layers, args.repeats = 64, 4, 32, 8, 1
        args.wide, args.wide_rows, args.deep_rows = [256, 8, 16], 16, 64
    os.environ["OMP_NUM_THREADS"] = str(args.threads)  # before torch starts: the children inherit it
    import_for_children("llama")
    import torch

    wide_hidden, wide_layers, wide_tokens = args.wide
    with tempfile.TemporaryDirectory() as tmp:
        default, deep, wide = Path(tmp) / "default", Path(tmp) / "deep", Path(tmp) / "wide"
        in_fresh_process(build_model, default, 64, 4)
        fixed = {"model": default, "tokens": args.tokens, "stop_at_eos": False, "batch_size": args.batch_size}
        memory_sizes = [m * args.rows for m in args.memory_multiples]
        if args.memory_only:
            print(
                json.dumps(
                    {"memory_growth, default / generate, fixed length": memory_growth(fixed, memory_sizes, args)}
                )
            )
            return
        grouping = (
            None
            if args.heap_only or args.phases_only
            else in_fresh_process(grouping_gain, default, args.rows, args.tokens, args)
        )
        if args.grouping_only:
            print(json.dumps({"grouping_by_length_bare_path": grouping, "rows": args.rows, "threads": args.threads}))
            return
        in_fresh_process(build_model, deep, 64, args.deep_layers)
        heap_cells = {  # the cell whose timings scattered most with page faults, and the default DAG's
            "deep / prompt": (
                {"model": deep, "tokens": 1, "stop_at_eos": True, "batch_size": args.batch_size},
                args.deep_rows,
            ),
            "default / generate, fixed length": (fixed, args.rows),
        }
        heap = (
            {} if args.phases_only else {name: heap_gain(cell, rows, args) for name, (cell, rows) in heap_cells.items()}
        )
        if args.heap_only:
            print(json.dumps({"keep_freed_memory_label": heap, "threads": args.threads}))
            return
        in_fresh_process(build_model, wide, wide_hidden, wide_layers)
        models = {
            "default": (default, args.rows, args.tokens, args.batch_size),
            "deep": (deep, args.deep_rows, args.tokens, args.batch_size),
            # the reference's fixed length only: its setting, and minutes of CPU per cell at this width
            "wide": (wide, args.wide_rows, wide_tokens, min(args.batch_size, args.wide_rows)),
        }
        phases = {
            f"{name} / prompt": in_fresh_process(
                label_phases, {"model": model, "tokens": 1, "stop_at_eos": True, "batch_size": batch_size}, rows, args
            )
            for name, (model, rows, _, batch_size) in models.items()
        }
        if args.phases_only:
            print(json.dumps({"label_phases, prompt mode": phases, "threads": args.threads}, indent=2))
            return
        results, cells = {}, {}
        for name, (model, rows, tokens, batch_size) in models.items():
            for mode, (n, stop) in {
                "prompt": (1, True),
                "generate, stop at EOS": (tokens, True),
                "generate, fixed length": (tokens, False),
            }.items():
                if name == "wide" and mode == "generate, stop at EOS":
                    continue
                cells[f"{name} / {mode}"] = {"model": model, "tokens": n, "stop_at_eos": stop, "batch_size": batch_size}
                results[f"{name} / {mode}"] = compare(cells[f"{name} / {mode}"], rows, args)
        memory = {  # the same cells at twice the rows (twice the shards): peak memory should not grow with them
            f"default / {mode} x2 rows": compare(cells[f"default / {mode}"], 2 * args.rows, args)
            for mode in ("prompt", "generate, fixed length")
        }
        codecs = {
            "default / generate, stop at EOS": measure_codecs(
                cells["default / generate, stop at EOS"], args.rows, args
            ),
            "wide / generate, fixed length": measure_codecs(
                cells["wide / generate, fixed length"], args.wide_rows, args
            ),
        }
        memory_at_scale = memory_growth(fixed, memory_sizes, args)
        capture = {
            name: in_fresh_process(hooks_vs_hidden_states, model, min(args.batch_size, rows), args)
            for name, (model, rows, _, _) in models.items()
        }
    summary = {
        cell: {k: r[k] for k in ("b_over_a", "b_over_c", "b_pooled_over_a", "b_pooled_over_c")}
        | {"bytes_over_npz": r["bytes_over_npz"]["store_with_tokens"]}
        for cell, r in results.items()
    }
    summary["peak_over_loaded_mb (rows -> 2x rows)"] = {
        mode: {
            approach: [
                results[f"default / {mode}"][approach]["peak_over_loaded_mb"],
                r[approach]["peak_over_loaded_mb"],
            ]
            for approach in APPROACHES
        }
        for mode, r in zip(("prompt", "generate, fixed length"), memory.values())
    }
    report = {
        "summary": summary,
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "cores": os.cpu_count(),
            "threads": args.threads,
            "torch": torch.__version__,
            "python": platform.python_version(),
        },
        "settings": {
            "rows": args.rows,
            "tokens": args.tokens,
            "batch_size": args.batch_size,
            "models": {
                "default": {"hidden": 64, "layers": 4},
                "deep": {"hidden": 64, "layers": args.deep_layers},
                "wide": {"hidden": wide_hidden, "layers": wide_layers, "tokens": wide_tokens, "rows": args.wide_rows},
            },
            "layers_kept": [-1],
            "compression": args.compression,
            "shard_rows": 4 * args.batch_size,
            "repeats": args.repeats,
        },
        "results": results | memory,
        "codecs": codecs,
        "forward_pass_reading": capture,
        "grouping_by_length_bare_path": grouping,
        "keep_freed_memory_label": heap,
        "label_phases, prompt mode": phases,
        "memory_growth, default / generate, fixed length": memory_at_scale,
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
