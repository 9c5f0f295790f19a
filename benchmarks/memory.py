"""Peak memory per rank and seconds of one SFT step and one GRPO step, per precision / parallelism config. JSON.

    PYTHONPATH=. python benchmarks/memory.py           # Qwen2.5-0.5B's shape, random weights (~10 min, 2-core CPU)
    PYTHONPATH=. python benchmarks/memory.py --quick   # a smoke run: the same configs on a 2-layer, 56-wide model

The model: benchmarks/label.py's build_qwen2 (the real Qwen tokenizer and 151,936-row vocabulary, 14 query / 2
key-value heads, tied embeddings, random weights) at Qwen2.5-0.5B's shape: hidden 896, 24 layers, MLP 4,864.

Each (config, step) runs in its own fresh process (`worker`; two torchrun ranks for the *_2ranks configs), so no
peak of another run or of the model build mixes in. A worker loads the model, builds what its config builds,
then resets its peak (/proc/self/clear_refs "5" sets VmHWM to the current RSS; on CUDA reset_peak_memory_stats)
and runs the one step. Reported per rank: the step's peak (VmHWM, or torch.cuda.max_memory_allocated), the RSS
before the step, and the activation memory: the peak after the forward (loss computed) over the RSS before it,
i.e. what the forward holds for the backward. A step's peak is that of its AdamW step as a rule (weights,
gradients and both moments at once); on the CPU it includes the process's libraries (~0.5 GB).

Every step runs through the execution layer the stages use (latentlab/common/execution.py): a `Learner` over the
trained modules, wrapped as the config's `launcher.strategy` says (ddp or fsdp, latentlab/common/parallel.py),
LoRA adapters as `model.adapter: lora` adds them (latentlab/lm/adapters.py: rank 8 on every projection),
activation checkpointing and bf16 weights as `gpu.gradient_checkpointing` and `model.dtype` set them
(latentlab/common/precision.py: AdamW then steps fp32 master copies).
SFT step: the masked causal-LM loss (lm/training.py) on random token ids, --batch x --seq split over the ranks
(checkpointing and its fp32 comparison at --long-batch x --long-seq), clipping, AdamW.
GRPO step: GRPOTrainer.step, --prompts arithmetic prompts x group 2 split over the ranks, 8 new tokens, a constant
reward (the loss pass and the update run all the same: the advantages are 0).
"""

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# config: (weights dtype, activation checkpointing, ranks, strategy, LoRA, long sequence, steps it measures)
CONFIGS = {
    "full_fp32": ("float32", False, 1, "ddp", False, False, ("sft", "grpo")),
    "ddp_2ranks": ("float32", False, 2, "ddp", False, False, ("sft", "grpo")),
    "fsdp_2ranks": ("float32", False, 2, "fsdp", False, False, ("sft", "grpo")),
    "lora": ("float32", False, 1, "ddp", True, False, ("sft", "grpo")),
    "bf16_weights": ("bfloat16", False, 1, "ddp", False, False, ("sft", "grpo")),
    "full_fp32_long": ("float32", False, 1, "ddp", False, True, ("sft",)),
    "checkpointing": ("float32", True, 1, "ddp", False, True, ("sft",)),
    "lora_checkpointing": ("float32", True, 1, "ddp", True, True, ("sft",)),
}


def rss_mb(field: str) -> float:
    """VmRSS (now) or VmHWM (the peak since the last reset) of this process, in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def reset_peak(device, tensors) -> float:
    """Start a new peak here; returns the memory in use now (MiB). On the CPU every tensor of `tensors` (the
    model's weights) is read first, so weights that safetensors maps lazily from disk are resident before the
    step, not counted as its activations, and freed heap memory (the whole weights FSDP2 cut into shards) is
    handed back to the OS (glibc's malloc_trim): RSS then counts what the step needs."""
    import ctypes
    import gc

    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        return torch.cuda.memory_allocated(device) / 2**20
    with torch.no_grad():
        for tensor in tensors:
            tensor = tensor.to_local() if hasattr(tensor, "to_local") else tensor
            tensor.sum()
    gc.collect()  # tensors that only a reference cycle still holds (a module's replaced parameters)
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    Path("/proc/self/clear_refs").write_text("5")
    return rss_mb("VmRSS")


def peak(device) -> float:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) / 2**20
    return rss_mb("VmHWM")


def worker(args) -> None:
    """One (config, step) in this process (a torchrun rank under the *_2ranks configs): its result, as JSON, in
    args.result_dir/rank<r>.json."""
    import latentlab  # noqa: F401  (first: the CPU kernels pinned before torch loads, as the stages pin them)

    # isort: split
    import torch

    from latentlab.common.distributed import Shards, distributed
    from latentlab.common.execution import Execution, Holder, Learner, Loss, Term
    from latentlab.common.precision import enable_gradient_checkpointing, weight_dtype
    from latentlab.lm.adapters import LoRAConfig, add_lora
    from latentlab.lm.modeling import load_lm
    from latentlab.lm.training import TokenBatch, masked_lm_sums

    torch.set_num_threads(args.threads)
    dtype, checkpointing, _, strategy, lora, long, _ = CONFIGS[args.worker]
    with distributed() as ranks:
        device = torch.device(f"cuda:{torch.cuda.current_device()}" if torch.cuda.is_available() else "cpu")
        torch.manual_seed(0)  # the same adapters on every rank
        model, tokenizer = load_lm(args.model_dir, device, dtype=weight_dtype(dtype))
        with torch.no_grad():  # out of safetensors' file mapping, as a GPU run copies them to the device: a shard
            for tensor in [*model.parameters(), *model.buffers()]:  # of one tensor would keep the whole file mapped
                tensor.data = tensor.data.clone()
        if lora:
            model = add_lora(model, LoRAConfig())
        if checkpointing:
            enable_gradient_checkpointing(model)
        execution = Execution(shards=Shards(ranks.world, ranks), strategy=strategy)
        forward_peak = None
        if args.step == "sft":
            seq, rows = (args.long_seq, args.long_batch) if long else (args.seq, args.batch)
            generator = torch.Generator().manual_seed(ranks.rank)
            ids = torch.randint(0, len(tokenizer), (rows // ranks.world, seq), generator=generator).to(device)
            batch = TokenBatch(ids, torch.ones_like(ids), torch.ones_like(ids))
            holder = Holder(model)
            learner = Learner(
                [(holder, "module")],
                lambda: [p for p in model.parameters() if p.requires_grad],
                lr=1e-5,
                steps=1,
                max_grad_norm=1.0,
                execution=execution,
            )

            def loss(part: TokenBatch) -> Loss:
                nonlocal forward_peak
                total, _ = masked_lm_sums(holder.module(input_ids=part.input_ids).logits, part)
                forward_peak = peak(device)  # what the forward holds for the backward
                return Loss({"lm": Term(total, "targets")})

            params = learner.parameters
            before = reset_peak(device, [*model.parameters(), *model.buffers()])
            started = time.perf_counter()
            model.train()
            learner.update([batch], loss=loss, counts=lambda b: {"targets": b.target_count()}, step=0)
        else:
            from latentlab.policies.lm_policy import LMPolicy
            from latentlab.rl.grpo import GRPOConfig, GRPOTrainer
            from latentlab.tasks.arithmetic import ArithmeticConfig, all_problems

            cfg = GRPOConfig(steps=1, prompts_per_step=args.prompts, group_size=2, max_new_tokens=8, lr=1e-5)
            trainer = GRPOTrainer(
                LMPolicy(model, tokenizer),
                lambda texts, targets: [0.0] * len(texts),
                cfg,
                execution.shards.generators(0, device),
                execution=execution,
            )
            params = trainer.learner.parameters
            problems = all_problems(ArithmeticConfig())[: args.prompts]
            before = reset_peak(device, [*model.parameters(), *model.buffers()])
            started = time.perf_counter()
            trainer.step(0, problems["prompt"].to_list(), problems["y"].to_list())
        seconds = time.perf_counter() - started
        result = {
            "peak_mb": round(peak(device), 1),
            "before_step_mb": round(before, 1),
            "activation_mb": None if forward_peak is None else round(forward_peak - before, 1),
            "seconds": round(seconds, 2),
            "trainable_params": sum(p.numel() for p in params),
            "params_dtype": str(next(model.parameters()).dtype),
        }
        Path(args.result_dir, f"rank{ranks.rank}.json").write_text(json.dumps(result))


def run(name: str, step: str, model_dir: str, args) -> dict:
    """One (config, step) in fresh processes; its ranks' results gathered."""
    ranks = CONFIGS[name][2]
    with tempfile.TemporaryDirectory() as results:
        worker_args = [str(Path(__file__).resolve()), "--worker", name, "--step", step, "--model-dir", model_dir]
        worker_args += ["--result-dir", results, "--threads", str(max(1, args.threads // ranks))]
        for option in ("seq", "batch", "long_seq", "long_batch", "prompts"):
            worker_args += [f"--{option.replace('_', '-')}", str(getattr(args, option))]
        if ranks == 1:
            command = [sys.executable, *worker_args]
        else:
            command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}"]
            command += worker_args
        env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": str(max(1, args.threads // ranks))}
        # every allocation of 1 MiB or more its own mapping, unmapped when freed: RSS then follows the tensors alive
        # (as CUDA's max_memory_allocated does), not what glibc's heap keeps of freed ones (FSDP2's per-block
        # buffers, below its default 32 MiB threshold, inflated its RSS by ~1.8 GB); the same for every config
        env["MALLOC_MMAP_THRESHOLD_"] = str(2**20)
        done = subprocess.run(command, env=env, capture_output=True, text=True)
        if done.returncode:
            raise RuntimeError(f"{name}/{step} failed:\n{done.stderr[-3000:]}")
        per_rank = [json.loads(Path(results, f"rank{r}.json").read_text()) for r in range(ranks)]
    activations = [r["activation_mb"] for r in per_rank]
    return {
        "peak_rss_mb_per_rank" if not args.cuda else "peak_cuda_mb_per_rank": [r["peak_mb"] for r in per_rank],
        "before_step_mb_per_rank": [r["before_step_mb"] for r in per_rank],
        "activation_mb_per_rank": activations if activations[0] is not None else None,
        "seconds_per_step": max(r["seconds"] for r in per_rank),
        "trainable_params": per_rank[0]["trainable_params"],
        "params_dtype": per_rank[0]["params_dtype"],
    }


def ratio(runs: dict, numerator: str, denominator: str, key: str, goal: str, met) -> dict:
    """A goal on runs[numerator][key] / runs[denominator][key] (max over ranks); None where a run is pending."""
    if numerator not in runs or denominator not in runs or runs[numerator][key] is None:
        return {"goal": goal, "value": None, "goal_met": None}
    value = max(runs[numerator][key]) / max(runs[denominator][key])
    return {"goal": goal, "value": round(value, 3), "goal_met": met(value)}


def model_summary(model_dir: str) -> dict:
    from transformers import AutoConfig

    from benchmarks.label import qwen2_shape

    config = AutoConfig.from_pretrained(model_dir)
    embed = config.vocab_size * config.hidden_size
    kv = config.hidden_size // config.num_attention_heads * config.num_key_value_heads
    attention = config.hidden_size * (config.hidden_size + 2 * kv) + config.hidden_size + 2 * kv  # qkv + bias
    attention += config.hidden_size * config.hidden_size
    block = attention + 3 * config.hidden_size * config.intermediate_size + 2 * config.hidden_size
    params = embed + config.num_hidden_layers * block + config.hidden_size
    return {**qwen2_shape(model_dir), "params": params, "params_m": round(params / 1e6, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run: 2 layers, width 56, short sequences")
    parser.add_argument("--seq", type=int, default=64, help="SFT tokens per row")
    parser.add_argument("--batch", type=int, default=4, help="SFT rows (split over the ranks)")
    parser.add_argument("--long-seq", type=int, default=512, help="tokens per row of the checkpointing comparison")
    parser.add_argument("--long-batch", type=int, default=2, help="rows of the checkpointing comparison")
    parser.add_argument("--prompts", type=int, default=2, help="GRPO prompts per step (x group 2)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads per config (split over its ranks)")
    parser.add_argument("--configs", nargs="+", choices=CONFIGS, default=list(CONFIGS), help="the configs to run")
    parser.add_argument("--worker", choices=CONFIGS, help=argparse.SUPPRESS)
    parser.add_argument("--step", choices=("sft", "grpo"), help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", help=argparse.SUPPRESS)
    parser.add_argument("--result-dir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    hidden, layers, intermediate = (56, 2, 64) if args.quick else (896, 24, 4864)
    if args.quick:
        args.seq, args.long_seq = 16, 64
    import torch

    args.cuda = torch.cuda.is_available()
    started = time.perf_counter()
    runs = {}
    with tempfile.TemporaryDirectory() as tmp:
        print(f"building the Qwen2-shaped model (hidden {hidden}, {layers} layers)", file=sys.stderr, flush=True)
        model_dir = str(Path(tmp) / "qwen2")
        build = (
            f"from benchmarks.label import build_qwen2; build_qwen2({model_dir!r}, {hidden}, {layers}, {intermediate})"
        )
        subprocess.run([sys.executable, "-c", build], env={**os.environ, "PYTHONPATH": str(ROOT)}, check=True)
        for name, (*_, steps) in CONFIGS.items():
            for step in steps if name in args.configs else ():
                print(f"{name}/{step}", file=sys.stderr, flush=True)
                runs[f"{name}/{step}"] = run(name, step, model_dir, args)
                print(json.dumps(runs[f"{name}/{step}"]), file=sys.stderr, flush=True)  # a cut-short run keeps it
        model = model_summary(model_dir)
    key = "peak_cuda_mb_per_rank" if args.cuda else "peak_rss_mb_per_rank"
    ratios = {
        "fsdp_over_ddp_peak_per_rank": ratio(
            runs, "fsdp_2ranks/sft", "ddp_2ranks/sft", key, "<= 0.6", lambda v: v <= 0.6
        ),
        "fsdp_over_ddp_peak_per_rank_grpo": ratio(
            runs, "fsdp_2ranks/grpo", "ddp_2ranks/grpo", key, "<= 0.6", lambda v: v <= 0.6
        ),
        "lora_over_full_peak": ratio(runs, "lora/sft", "full_fp32/sft", key, "<= 0.4", lambda v: v <= 0.4),
        "lora_over_full_peak_grpo": ratio(runs, "lora/grpo", "full_fp32/grpo", key, "<= 0.4", lambda v: v <= 0.4),
        "full_over_checkpointing_activations": ratio(
            runs, "full_fp32_long/sft", "checkpointing/sft", "activation_mb_per_rank", ">= 2", lambda v: v >= 2
        ),
        "lora_over_full_activations_checkpointed": ratio(
            runs, "full_fp32_long/sft", "lora_checkpointing/sft", "activation_mb_per_rank", "context", lambda v: None
        ),
        "bf16_over_fp32_peak": ratio(runs, "bf16_weights/sft", "full_fp32/sft", key, "context", lambda v: None),
    }
    result = {
        "benchmark": "memory_per_rank",
        "model": model,
        "settings": {
            "sft": f"{args.batch} x {args.seq} tokens (checkpointing: {args.long_batch} x {args.long_seq})",
            "grpo": f"{args.prompts} prompts x group 2, 8 new tokens",
            "threads_per_config": args.threads,
            "device": "cuda" if args.cuda else "cpu",
            "torch": torch.__version__,
            "machine": f"{platform.machine()}, {os.cpu_count()} cores",
            "quick": args.quick,
        },
        "runs": runs,
        "ratios": ratios,
        "wall_s": round(time.perf_counter() - started, 1),
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
