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


def worker(seconds: float) -> None:
    import torch  # before latentlab, so the scenario's environment alone sets the OpenMP wait policy

    from latentlab.common.runtime import seed_everything
    from latentlab.lm.modeling import TinyLMConfig, build_tiny_lm
    from latentlab.lm.tokenizer import build_char_tokenizer

    generator = seed_everything(0)
    tokenizer = build_char_tokenizer()
    model = build_tiny_lm(TinyLMConfig(), tokenizer)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ids = torch.randint(0, len(tokenizer), (64, 64), generator=generator)

    def step() -> None:
        loss = model(input_ids=ids, labels=ids).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    for _ in range(3):  # warm-up: allocator and kernels
        step()
    steps, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        step()
        steps += 1
    print(json.dumps({"steps_per_s": steps / (time.perf_counter() - start), "threads": torch.get_num_threads()}))


def scenario(threads: int, jobs: int, seconds: float, passive: bool) -> dict:
    env = {**os.environ, "LATENTLAB_THREADS": str(threads)}
    env.pop("OMP_WAIT_POLICY", None)
    if passive:
        env["OMP_WAIT_POLICY"] = "PASSIVE"
    command = [sys.executable, __file__, "--worker", "--seconds", str(seconds)]
    procs = [subprocess.Popen(command, env=env, stdout=subprocess.PIPE, text=True) for _ in range(jobs)]
    results = [json.loads(p.communicate()[0]) for p in procs]
    speeds = [r["steps_per_s"] for r in results]
    return {
        "threads": threads,
        "jobs": jobs,
        "omp_wait_policy": "PASSIVE" if passive else "libgomp default (spin)",
        "steps_per_s": [round(s, 3) for s in speeds],
        "machine_steps_per_s": round(sum(speeds), 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=20.0, help="measured seconds per scenario")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args.seconds)
    cores = os.cpu_count() or 1
    counts = sorted({1, max(1, cores // 2), cores})
    rows = []
    for passive in (False, True):
        for threads in counts:
            for jobs in (1, 2):
                rows.append(scenario(threads, jobs, args.seconds, passive))
                print(json.dumps(rows[-1]), file=sys.stderr)
    alone = {(r["threads"], r["omp_wait_policy"]): r["steps_per_s"][0] for r in rows if r["jobs"] == 1}
    for r in rows:  # each job's speed beside another, as a share of the same setting alone
        r["share_of_alone"] = round(min(r["steps_per_s"]) / alone[(r["threads"], r["omp_wait_policy"])], 3)
    print(json.dumps({"cores": cores, "seconds": args.seconds, "scenarios": rows}, indent=2))


if __name__ == "__main__":
    main()
