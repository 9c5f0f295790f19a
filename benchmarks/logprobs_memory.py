"""Peak memory of the training log-probs at a 152k vocabulary: the full (B, T, V) float32 log_softmax (before)
against the chunked selected-token log-probs (lm/logprobs.py). Prints JSON.

    PYTHONPATH=. python benchmarks/logprobs_memory.py [--batch 8 --tokens 256]

Workload: a Qwen2-shaped model (2 blocks, GQA 4/2 heads, width 128, tied embeddings, vocabulary 151,936, random
weights) scores `batch` completions of `tokens` tokens after an 8-token prompt with gradients and runs the backward
pass of their summed log-probs (a policy-gradient step's log-prob work), and again without gradients (pi_old, a
reference). Each variant runs in a fresh process; `peak_mib` is its peak resident memory above what it held once
the model was built (psutil-free: `resource.getrusage` ru_maxrss), `seconds` the wall time of the measured pass.
"""

import argparse
import json
import subprocess
import sys
import time

VOCAB = 151_936


def worker(variant: str, grad: bool, batch: int, tokens: int) -> dict:
    import resource

    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from latentlab.lm.logprobs import tempered_logprobs
    from latentlab.lm.sampling import Completions, completion_logprobs, teacher_forced_logits

    torch.manual_seed(0)
    torch.set_num_threads(1)
    config = Qwen2Config(
        vocab_size=VOCAB,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
    )
    model = Qwen2ForCausalLM(config).eval()
    prompt = torch.randint(VOCAB, (batch, 8))
    ids = torch.randint(VOCAB, (batch, tokens))
    completions = Completions(ids, torch.ones_like(ids, dtype=torch.bool), torch.zeros(ids.shape))
    mask = torch.ones_like(prompt)

    def score():
        embeds = model.get_input_embeddings()(prompt)
        if variant == "full":  # before: teacher-forced (B, T, V) logits, one float32 log_softmax, gather
            logits = teacher_forced_logits(model, embeds, mask, completions)
            return tempered_logprobs(logits, 1.0).gather(-1, ids[..., None]).squeeze(-1) * completions.mask
        return completion_logprobs(model, embeds, mask, completions)

    baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    started = time.perf_counter()
    with torch.set_grad_enabled(grad):
        logprobs = score()
        if grad:
            logprobs.sum().backward()
    seconds = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"peak_mib": round((peak - baseline) / 1024, 1), "seconds": round(seconds, 3)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--worker", nargs=2)
    args = parser.parse_args()
    if args.worker:
        variant, grad = args.worker
        print(json.dumps(worker(variant, grad == "grad", args.batch, args.tokens)))
        return
    results = {"vocab": VOCAB, "batch": args.batch, "tokens": args.tokens}
    full_logits_mib = args.batch * args.tokens * VOCAB * 4 / 2**20
    results["one_full_fp32_logits_mib"] = round(full_logits_mib, 1)
    for grad in ("grad", "no_grad"):
        for variant in ("full", "chunked"):
            out = subprocess.run(
                [sys.executable, __file__, "--batch", str(args.batch), "--tokens", str(args.tokens)]
                + ["--worker", variant, grad],
                capture_output=True,
                text=True,
                check=True,
            )
            results[f"{variant}_{grad}"] = json.loads(out.stdout.strip().splitlines()[-1])
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
