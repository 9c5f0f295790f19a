"""The `base` stage's training step against its FLOP floor. Prints JSON.

    PYTHONPATH=. python benchmarks/pretrain.py [--threads 1] [--steps 20] [--compile]

Workload: the stage's step (forward, masked LM loss, backward, AdamW, clipping) on the default scratch
model (params.yaml `model`, random init), batch `base.batch_size` x `base.sequence_chars` tokens.

Three floors, each a lower bound on the step's time:
- `flop_floor`: the step's FLOPs at this machine's dense matmul rate (a 1024^3 sgemm on the same threads).
  FLOPs per token, training = 3 x forward (the backward is two matmuls per forward matmul, Kaplan et al. 2020):
      forward = 2 N_matmul  +  2 n_layers T d   (causal attention: QK^T and AV over T/2 keys on average)
  N_matmul counts the decoder's projection weights and the (tied) output head, not the input embedding.
- `gemm_floor`: the same matmuls at the model's real shapes ((B T) x d times d x d_out, forward and the two
  backward products), timed alone: what a perfectly fused implementation would still pay at width d.
- the measured step: Hugging Face's Llama in eager PyTorch (what the stage runs) and, with `--compile`,
  `torch.compile` of the same model (compile seconds reported apart; it is off in the stage, see below).
Steps are interleaved with the floors' repeats, so noise hits all of them alike; medians are reported.
"""

import argparse
import json
import statistics
import time

import latentlab  # noqa: F401  (first: the CPU kernels pinned before torch loads, as the stages pin them)

# isort: split
import torch

from latentlab.common.optim import build_optimizer
from latentlab.lm.modeling import build_tiny_lm
from latentlab.lm.tokenizer import build_char_tokenizer
from latentlab.lm.training import TokenBatch, masked_lm_loss
from stages.params import load_params


def matmul_shapes(cfg, vocab: int) -> list[tuple[int, int]]:
    """(d_in, d_out) of every matmul weight a token passes through: per layer q, k, v, o, gate, up, down; the head."""
    d, kv = cfg.hidden_size, cfg.hidden_size // cfg.heads * (cfg.kv_heads or cfg.heads)
    layer = [(d, d), (d, kv), (d, kv), (d, d), (d, cfg.intermediate_size), (d, cfg.intermediate_size)]
    layer.append((cfg.intermediate_size, d))
    return layer * cfg.layers + [(d, vocab)]


def step_flops(cfg, vocab: int, batch: int, seq: int) -> float:
    n_matmul = sum(i * o for i, o in matmul_shapes(cfg, vocab))
    forward_per_token = 2 * n_matmul + 2 * cfg.layers * seq * cfg.hidden_size
    return 3.0 * forward_per_token * batch * seq


def sgemm_rate(size: int = 1024, repeats: int = 5) -> float:
    """FLOP/s of a square float32 matmul on the current threads (best of `repeats`)."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b
    best = min(_timed(lambda: a @ b) for _ in range(repeats))
    return 2 * size**3 / best


def _timed(fn) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def gemm_floor_fn(shapes: list[tuple[int, int]], rows: int):
    """Forward x W and the backward products dX = dY W^T, dW = X^T dY for every shape: matmuls and nothing else."""
    operands = [(torch.randn(rows, i), torch.randn(i, o), torch.randn(rows, o)) for i, o in shapes]

    def run() -> None:
        for x, w, dy in operands:
            x @ w
            dy @ w.T
            x.T @ dy

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--steps", type=int, default=20, help="timed steps per variant (in 4 interleaved rounds)")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile (about a minute to compile)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    params = load_params()
    cfg, batch, seq = params.model, params.base.batch_size, params.base.sequence_chars
    tokenizer = build_char_tokenizer()
    torch.manual_seed(0)
    model = build_tiny_lm(cfg, tokenizer).train()
    ids = torch.randint(0, len(tokenizer), (batch, seq))
    tokens = TokenBatch(ids, torch.ones_like(ids), torch.ones_like(ids))
    optimizer, schedule = build_optimizer(model.parameters(), params.base.lr, 10**6, 0)

    def make_step(forward):
        def step() -> None:
            loss = masked_lm_loss(
                forward(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask).logits, tokens
            )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), params.base.max_grad_norm)
            optimizer.step()
            schedule.step()

        return step

    variants = {
        "eager_step": make_step(model),
        "gemm_floor": gemm_floor_fn(matmul_shapes(cfg, len(tokenizer)), batch * seq),
    }
    compile_seconds = None
    if args.compile:
        compiled = make_step(torch.compile(model))
        compile_seconds = _timed(compiled)
        variants["compiled_step"] = compiled
    for run in variants.values():  # warm-up: allocator, kernels
        run()
    times: dict[str, list[float]] = {name: [] for name in variants}
    rounds = 4
    for _ in range(rounds):
        for name, run in variants.items():
            times[name] += [_timed(run) for _ in range(max(1, args.steps // rounds))]
    rate = sgemm_rate()
    flops = step_flops(cfg, len(tokenizer), batch, seq)
    seconds = {name: statistics.median(values) for name, values in times.items()}
    flop_floor = flops / rate
    result = {
        "threads": args.threads,
        "model": {"hidden_size": cfg.hidden_size, "layers": cfg.layers, "parameters": model.num_parameters()},
        "batch_tokens": batch * seq,
        "step_gflop": round(flops / 1e9, 3),
        "sgemm_gflop_per_s": round(rate / 1e9, 1),
        "seconds_per_step": {name: round(value, 4) for name, value in seconds.items()}
        | {"flop_floor": round(flop_floor, 4)},
        "tokens_per_s": {name: round(batch * seq / value) for name, value in seconds.items()}
        | {"flop_floor": round(batch * seq / flop_floor)},
        "eager_over_flop_floor": round(seconds["eager_step"] / flop_floor, 2),
        "eager_over_gemm_floor": round(seconds["eager_step"] / seconds["gemm_floor"], 2),
        "gemm_floor_over_flop_floor": round(seconds["gemm_floor"] / flop_floor, 2),
        "achieved_gflop_per_s": round(flops / seconds["eager_step"] / 1e9, 1),
    }
    if compile_seconds is not None:
        result["compile_seconds"] = round(compile_seconds, 1)
        result["eager_over_compiled"] = round(seconds["eager_step"] / seconds["compiled_step"], 2)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
