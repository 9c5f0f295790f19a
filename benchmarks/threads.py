"""Training speed of a stage's inner loop by thread count, alone and with a second job on the machine. Prints JSON.

Why: a stage that takes every core runs fine alone but can collapse when another job shares the machine
(OpenMP workers spin-wait for cores the other job holds). This measures what each default would cost:

    PYTHONPATH=. python benchmarks/threads.py --seconds 20

Workload: the `base` stage's step (forward, masked LM loss, backward, AdamW) on the default scratch model,
batch 64 x 64 characters. Each scenario starts its jobs together and counts the steps every job finishes in
`--seconds` after a warm-up; `steps_per_s` is per job, `machine_steps_per_s` the sum over jobs.
Scenarios: N threads alone; two jobs of N threads each at once (a sweep with two local workers, or a
`dvc repro` beside a test run); each with libgomp's default wait policy (idle threads spin ~300k times
before sleeping: what stages did before) and with OMP_WAIT_POLICY=PASSIVE (they sleep at once: what
`import latentlab` now sets unless the environment says otherwise).
"""

import argparse
import json
import os
import subprocess
import sys
import time


def worker(seconds: float, workload: str) -> None:
    import torch  # before latentlab, so the scenario's environment alone sets the OpenMP wait policy

    from latentlab.common.runtime import seed_everything
    from latentlab.lm.modeling import TinyLMConfig, build_tiny_lm
    from latentlab.lm.sampling import SamplingConfig, completion_logprobs, sample, tokenize_prompts
    from latentlab.lm.tokenizer import build_char_tokenizer

    generator = seed_everything(0)
    tokenizer = build_char_tokenizer()
    model = build_tiny_lm(TinyLMConfig(hidden_size=64), tokenizer)  # the default DAG's model size
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ids = torch.randint(0, len(tokenizer), (64, 64), generator=generator)
    prompts = [f"{i % 50}+{i % 37}=" for i in range(128)]  # 16 prompts x G = 8, as the grpo stage samples
    prompt_ids, prompt_mask = tokenize_prompts(tokenizer, prompts, "cpu")
    sampling = SamplingConfig(max_new_tokens=6)

    def pretrain_step() -> None:  # the base stage: one large batch, few large matmuls
        loss = model(input_ids=ids, labels=ids).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    def grpo_step() -> None:  # the grpo stage: 6 sampling steps of small matmuls, then the scoring pass
        embeds = model.get_input_embeddings()(prompt_ids)
        with torch.no_grad():
            done = sample(
                model, embeds, prompt_mask, sampling, tokenizer.eos_token_id, tokenizer.pad_token_id, generator
            )
        logprobs = completion_logprobs(model, model.get_input_embeddings()(prompt_ids), prompt_mask, done)
        optimizer.zero_grad()
        (-logprobs.sum() / len(prompts)).backward()
        optimizer.step()

    step = {"pretrain": pretrain_step, "grpo": grpo_step}[workload]
    for _ in range(3):  # warm-up: allocator and kernels
        step()
    steps, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        step()
        steps += 1
    print(json.dumps({"steps_per_s": steps / (time.perf_counter() - start), "threads": torch.get_num_threads()}))


WAIT_POLICIES = {  # environment of each policy; libgomp reads it when torch loads
    "spin (libgomp default)": {},
    "PASSIVE": {"OMP_WAIT_POLICY": "PASSIVE"},
    "GOMP_SPINCOUNT=10000": {"GOMP_SPINCOUNT": "10000"},
}


def scenario(threads: int, jobs: int, seconds: float, policy: str, workload: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    env |= {"LATENTLAB_THREADS": str(threads), **WAIT_POLICIES[policy]}
    command = [sys.executable, __file__, "--worker", "--seconds", str(seconds), "--workload", workload]
    procs = [subprocess.Popen(command, env=env, stdout=subprocess.PIPE, text=True) for _ in range(jobs)]
    results = [json.loads(p.communicate()[0]) for p in procs]
    speeds = [r["steps_per_s"] for r in results]
    return {
        "workload": workload,
        "threads": threads,
        "jobs": jobs,
        "omp_wait_policy": policy,
        "steps_per_s": [round(s, 3) for s in speeds],
        "machine_steps_per_s": round(sum(speeds), 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=15.0, help="measured seconds per scenario")
    parser.add_argument("--workloads", nargs="+", default=["pretrain", "grpo"], choices=["pretrain", "grpo"])
    parser.add_argument("--policies", nargs="+", default=list(WAIT_POLICIES), choices=list(WAIT_POLICIES))
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--workload", default="pretrain", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args.seconds, args.workload)
    cores = os.cpu_count() or 1
    counts = sorted({1, cores})
    rows = []
    for workload in args.workloads:
        for threads in counts:
            for policy in args.policies if threads > 1 else args.policies[:1]:  # one thread: no team to wait
                for jobs in (1, 2):
                    rows.append(scenario(threads, jobs, args.seconds, policy, workload))
                    print(json.dumps(rows[-1]), file=sys.stderr)
    alone = {(r["workload"], r["threads"], r["omp_wait_policy"]): r["steps_per_s"][0] for r in rows if r["jobs"] == 1}
    for r in rows:  # each job's speed beside another, as a share of the same setting alone
        r["share_of_alone"] = round(
            min(r["steps_per_s"]) / alone[(r["workload"], r["threads"], r["omp_wait_policy"])], 3
        )
    print(json.dumps({"cores": cores, "seconds": args.seconds, "scenarios": rows}, indent=2))


if __name__ == "__main__":
    main()
