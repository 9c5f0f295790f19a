"""What checking a model against its manifest costs `load_lm`. Prints JSON.

    PYTHONPATH=. python benchmarks/load_verify.py [--repeats 5]

`load_lm` hashes every file the manifest's content hash covers (latentlab/lm/modeling.py: `verify_manifest`)
before transformers maps the weights; the read that hashes them leaves them in the page cache, so the pages the
model touches later come from memory. Models: the default scratch model (params.yaml's `model` section) and a
randomly initialised Llama of about 100 MB (H=768, 4 blocks, MLP 2048, fp32), each saved with `save_lm` into a
temporary directory. Loads with and without the check alternate (which goes first alternates too):
`load_s` is `load_lm` alone (transformers maps the safetensors file: a weight is read when first touched),
`load_use_s` is `load_lm` plus reading every parameter once (what the first forward pass or `.to("cuda")` does),
on a warm page cache and on a cold one (the files' cached pages dropped with posix_fadvise before each load).
`hash_s` is the hash alone, warm. Times are medians over `--repeats`.
"""

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from latentlab.lm.modeling import TinyLMConfig, build_tiny_lm, content_hash, hashed_files, load_lm, save_lm
from latentlab.lm.tokenizer import build_char_tokenizer

LARGE = TinyLMConfig(hidden_size=768, layers=4, heads=12, intermediate_size=2048, max_positions=128)


def default_model() -> TinyLMConfig:
    try:
        from stages.params import load_params

        return load_params("params.yaml").model
    except Exception:  # run outside the project root: the library's defaults
        return TinyLMConfig()


def drop_cache(directory: Path) -> None:
    """Evict the directory's files from the page cache (only these files: nothing else on the machine)."""
    for file in directory.iterdir():
        with file.open("rb") as handle:
            os.fsync(handle.fileno())
            os.posix_fadvise(handle.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)


def timed_load(directory: Path, verify: bool, use: bool) -> float:
    start = time.perf_counter()
    model, _ = load_lm(directory, verify=verify)
    if use:
        for parameter in model.parameters():
            parameter.detach().sum()
    return time.perf_counter() - start


def measure(cfg: TinyLMConfig, directory: Path, repeats: int) -> dict:
    torch.manual_seed(0)
    tokenizer = build_char_tokenizer()
    model = build_tiny_lm(
        TinyLMConfig.model_validate(cfg.model_dump(include=set(TinyLMConfig.model_fields))), tokenizer
    )
    save_lm(model, tokenizer, directory, source="scratch")
    size = sum(file.stat().st_size for file in hashed_files(directory))
    load_lm(directory)  # warm-up: imports, page cache
    result = {"parameters": model.num_parameters(), "hashed_bytes": size}
    for cache in ("warm", "cold"):
        times = {}
        for repeat in range(repeats):
            for use in (False, True):
                for verify in (True, False) if repeat % 2 == 0 else (False, True):
                    if cache == "cold":
                        drop_cache(directory)
                    key = f"load{'_use' if use else ''}{'_verified' if verify else ''}_s"
                    times.setdefault(key, []).append(timed_load(directory, verify, use))
        result[cache] = {key: round(statistics.median(values), 4) for key, values in sorted(times.items())}
    hashes = []
    for _ in range(repeats):
        start = time.perf_counter()
        content_hash(directory)
        hashes.append(time.perf_counter() - start)
    result["hash_s"] = round(statistics.median(hashes), 4)
    result["hash_gb_per_s"] = round(size / statistics.median(hashes) / 1e9, 2)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)
    from transformers.utils import logging

    logging.disable_progress_bar()
    results = {"repeats": args.repeats, "torch_threads": 1}
    for name, cfg in (("default_scratch", default_model()), ("llama_100mb", LARGE)):
        with tempfile.TemporaryDirectory() as directory:
            results[name] = measure(cfg, Path(directory), args.repeats)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
