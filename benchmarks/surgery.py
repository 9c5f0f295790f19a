"""SurgicalTheater vs cloning the model, per surgical evaluation: extra peak memory and time. Prints JSON.

One surgical evaluation = scale the heads of every targeted projection (the surgeon's edit), score a
probe batch (one teacher-forced forward pass, latentlab.rl.surgeon.probe) and discard the edit:
  theater: `with SurgicalTheater(model, targets)`: snapshot the targets, edit in place, score, restore;
  clone:   `copy.deepcopy(model)`, edit the copy, score it, drop it;
  plain:   score the unedited model (no edit at all): what any evaluation costs by itself.
Targets: q, k, v, o of all blocks, of the last two (the stage's default) or of the last one. The
`overhead_only` section times the two ways without the scoring pass (what they cost beyond it); the
`whole_evaluation` section includes it, with the stage's targets.

Memory, two ways, both reported:
  - `held_bytes`: exact bytes of the tensors each way creates and holds (the theater's snapshot; the
    clone's parameters and buffers);
  - `extra_peak_rss_bytes`: the process's peak RSS during one evaluation minus its RSS just before it
    (Linux: /proc/self/clear_refs resets VmHWM, /proc/self/status reads it). The worker runs with a fixed
    glibc mmap threshold (MALLOC_MMAP_THRESHOLD_) so freed tensors go back to the OS and each repeat is
    measured from the same start. This includes the forward pass's activations, which every way pays.
Time: wall clock of one evaluation; the three ways interleaved in every round, median over rounds.
Models: the default scratch model (Llama, H=64, 4 blocks) and a larger scratch model (H=512, 12 blocks).
"""

import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import time

import latentlab  # noqa: F401  (first: the CPU kernels pinned before torch loads, as the stages pin them)

# isort: split
import torch

from latentlab.lm.modeling import TinyLMConfig, build_tiny_lm
from latentlab.lm.surgery import SurgicalTheater, attention_targets, scale_heads
from latentlab.lm.tokenizer import build_char_tokenizer
from latentlab.rl.surgeon import probe

PROBES = 32  # problems scored per evaluation
SIZES = {
    "default (H=64, 4 blocks)": dict(hidden_size=64, layers=4, heads=4, intermediate_size=256, max_positions=64),
    "scratch (H=512, 12 blocks)": dict(hidden_size=512, layers=12, heads=8, intermediate_size=2048, max_positions=64),
}


def status_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith(field + ":"))


def measure(fn) -> tuple[float, int]:
    """(seconds, extra peak RSS bytes) of one call."""
    with open("/proc/self/clear_refs", "w") as clear:
        clear.write("5")  # reset the peak (VmHWM) to the current RSS
    before = status_kib("VmRSS")
    started = time.perf_counter()
    fn()
    seconds = time.perf_counter() - started
    return seconds, (status_kib("VmHWM") - before) * 1024


TARGET_SETS = {"all blocks": None, "last 2 blocks (the stage's default)": [-2, -1], "last block": [-1]}


def compare(ways: dict, repeats: int) -> dict:
    """Median seconds and extra peak RSS of each way, the ways interleaved in every round."""
    for fn in ways.values():  # warm-up: first-call allocations and lazy initialisation
        fn()
    results = {name: {"seconds": [], "rss": []} for name in ways}
    for _ in range(repeats):
        for name, fn in ways.items():  # interleaved: drifts of a shared machine hit every way alike
            seconds, rss = measure(fn)
            results[name]["seconds"].append(seconds)
            results[name]["rss"].append(rss)
    return {
        name: {
            "seconds_median": statistics.median(r["seconds"]),
            "extra_peak_rss_bytes_median": int(statistics.median(r["rss"])),
        }
        for name, r in results.items()
    }


def ratio(a: float, b: float) -> float:
    return a / b if b > 0 else float("nan")


def worker(size: str, repeats: int) -> dict:
    torch.manual_seed(0)
    tokenizer = build_char_tokenizer()
    model = build_tiny_lm(TinyLMConfig(**SIZES[size]), tokenizer).eval()
    problems = [(a, 31 - a) for a in range(PROBES)]
    prompts, answers = [f"{a}+{b}=" for a, b in problems], [str(a + b) for a, b in problems]
    model_bytes = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    out = {"parameters": sum(p.numel() for p in model.parameters()), "model_bytes": model_bytes}

    def edit_ways(layers, evaluate: bool) -> dict:
        targets = attention_targets(model, layers)
        factors = 1 + 0.1 * (torch.rand(len(targets), max(t.heads for t in targets)) * 2 - 1)

        def theater():
            with SurgicalTheater(model, targets):
                scale_heads(targets, factors)
                if evaluate:
                    probe(model, tokenizer, prompts, answers)

        def clone():
            twin = copy.deepcopy(model)
            scale_heads(attention_targets(twin, layers), factors)
            if evaluate:
                probe(twin, tokenizer, prompts, answers)
            del twin

        return {"theater": theater, "clone": clone}

    # the overhead of the two ways alone (snapshot + edit + restore vs deepcopy + edit + drop), per target set
    out["overhead_only"] = {}
    for name, layers in TARGET_SETS.items():
        r = compare(edit_ways(layers, evaluate=False), repeats)
        held = SurgicalTheater(model, attention_targets(model, layers)).snapshot_bytes
        r["held_bytes"] = {"theater": held, "clone": model_bytes}
        r["ratios"] = {
            "held_bytes_theater_over_clone": ratio(held, model_bytes),
            "extra_peak_rss_theater_over_clone": ratio(
                r["theater"]["extra_peak_rss_bytes_median"], r["clone"]["extra_peak_rss_bytes_median"]
            ),
            "speedup_clone_over_theater": ratio(r["clone"]["seconds_median"], r["theater"]["seconds_median"]),
        }
        out["overhead_only"][name] = r

    # one whole surgical evaluation (edit + score the probe + discard) with the stage's targets, and the
    # evaluation alone ("plain"), which both ways pay
    layers = TARGET_SETS["last 2 blocks (the stage's default)"]
    full = compare({"plain": lambda: probe(model, tokenizer, prompts, answers), **edit_ways(layers, True)}, repeats)
    plain_rss = full["plain"]["extra_peak_rss_bytes_median"]
    full["ratios"] = {
        "extra_peak_rss_theater_over_clone": ratio(
            full["theater"]["extra_peak_rss_bytes_median"], full["clone"]["extra_peak_rss_bytes_median"]
        ),
        "extra_peak_rss_beyond_plain_theater_over_clone": ratio(
            max(0, full["theater"]["extra_peak_rss_bytes_median"] - plain_rss),
            full["clone"]["extra_peak_rss_bytes_median"] - plain_rss,
        ),
        "speedup_clone_over_theater": ratio(full["clone"]["seconds_median"], full["theater"]["seconds_median"]),
    }
    out["whole_evaluation"] = full
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--worker", choices=list(SIZES))
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("LATENTLAB_THREADS", "0")) or torch.get_num_threads())
    if args.worker:
        print(json.dumps(worker(args.worker, args.repeats)))
        return
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}
    report = {
        "what": f"surgical evaluation: edit q,k,v,o of the targeted blocks, score {PROBES} problems, discard",
        "memory": "held_bytes: exact tensor bytes; extra_peak_rss: VmHWM - VmRSS around one evaluation",
        "threads": torch.get_num_threads(),
        "repeats": args.repeats,
    }
    for size in SIZES:
        command = [sys.executable, __file__, "--worker", size, "--repeats", str(args.repeats)]
        report[size] = json.loads(subprocess.run(command, env=env, check=True, capture_output=True, text=True).stdout)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
