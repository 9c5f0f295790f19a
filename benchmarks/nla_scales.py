"""What NLA's `measure_scales` costs at a real vocabulary: today's batched pass of the decoder body against the
one it replaced (one forward over every text with full logits and every hidden state). Prints JSON.

    PYTHONPATH=. python benchmarks/nla_scales.py [--texts 256] [--vocab 151936] [--batch-size 64]

Model: a randomly initialised Qwen2-shaped LM (H=64, 4 blocks, tied embeddings) with a `--vocab` row vocabulary
(Qwen2/Qwen3's 151,936 by default) and the character tokenizer (the texts' ids are characters; the LM head's
width is what the old way pays for). Texts: arithmetic lines of 8-30 characters, the shape of the NLA table's
responses. Layers: the default actor's [0, 2] and the final norm. Each way runs in a fresh process (peak RSS is
per process): `peak_rss_mb` is that process's peak resident memory less its resident memory just before the
call, `seconds` the call's wall time; `equal` says whether both returned the same floats, bit for bit.
"""

import argparse
import json
import random
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from latentlab.lm.padding import pad_sequences  # noqa: E402
from latentlab.lm.tokenizer import build_char_tokenizer  # noqa: E402
from latentlab.policies.nla_actor import measure_scales  # noqa: E402

LAYERS = [0, 2, -1]


@torch.no_grad()
def measure_scales_before(model, tokenizer, layers, texts):
    """measure_scales before issue 27, verbatim: one forward over every text, logits and all hidden states."""
    ids, mask = pad_sequences(tokenizer(texts, add_special_tokens=False)["input_ids"], tokenizer.pad_token_id, False)
    device = next(model.parameters()).device
    out = model(input_ids=ids.to(device), attention_mask=mask.to(device), output_hidden_states=True)
    real = mask.bool().to(device)
    return [out.hidden_states[layer][real].float().norm(dim=-1).mean().item() for layer in layers]


def rss_mb() -> float:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * resource.getpagesize() / 2**20


def texts(n: int) -> list[str]:
    rng = random.Random(0)
    lines = []
    for _ in range(n):
        line = f"{rng.randint(0, 49)}{rng.choice('+-')}{rng.randint(0, 49)}={rng.randint(0, 99)}\n"
        while len(line) < rng.randint(8, 30):
            line += f"{rng.randint(0, 49)}+{rng.randint(0, 49)}="
        lines.append(line[:30])
    return lines


def child(args) -> dict:
    from transformers import AutoModelForCausalLM, Qwen2Config

    torch.manual_seed(0)
    torch.set_num_threads(1)
    tokenizer = build_char_tokenizer()
    config = Qwen2Config(
        vocab_size=args.vocab,
        hidden_size=64,
        intermediate_size=256,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    model = AutoModelForCausalLM.from_config(config).eval()
    rows = texts(args.texts)
    before = rss_mb()
    start = time.perf_counter()
    if args.variant == "before":
        scales = measure_scales_before(model, tokenizer, LAYERS, rows)
    else:
        scales = measure_scales(model, tokenizer, LAYERS, rows, batch_size=args.batch_size)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    tokens = sum(len(t) for t in tokenizer(rows, add_special_tokens=False)["input_ids"])
    longest = max(len(t) for t in tokenizer(rows, add_special_tokens=False)["input_ids"])
    return {
        "scales": scales,
        "seconds": round(seconds, 3),
        "peak_rss_mb": round(peak - before, 1),
        "tokens": tokens,
        "longest": longest,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--texts", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=151_936)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--variant", choices=["before", "now"], default=None)
    args = parser.parse_args()
    if args.variant:
        print(json.dumps(child(args)))
        return
    results = {}
    for variant in ("before", "now"):
        command = [sys.executable, __file__, "--variant", variant, "--texts", str(args.texts)]
        command += ["--vocab", str(args.vocab), "--batch-size", str(args.batch_size)]
        done = subprocess.run(command, check=True, capture_output=True, text=True, cwd=ROOT)
        results[variant] = json.loads(done.stdout.strip().splitlines()[-1])
    before, now = results["before"], results["now"]
    logits_mb = args.texts * before["longest"] * args.vocab * 4 / 2**20
    print(
        json.dumps(
            {
                "vocab": args.vocab,
                "texts": args.texts,
                "tokens": now["tokens"],
                "batch_size": args.batch_size,
                "layers": LAYERS,
                "logits_of_the_old_pass_mb": round(logits_mb, 1),
                "before": {k: before[k] for k in ("seconds", "peak_rss_mb")},
                "now": {k: now[k] for k in ("seconds", "peak_rss_mb")},
                "peak_ratio": round(before["peak_rss_mb"] / max(now["peak_rss_mb"], 0.1), 1),
                "equal": before["scales"] == now["scales"],
                "scales": now["scales"],
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
