"""Serve the pipeline flow as a deployment on a cron schedule, against a Prefect server.

    prefect server start                                  # in another terminal (UI: http://127.0.0.1:4200)
    export PREFECT_API_URL=http://127.0.0.1:4200/api
    python -m flows.deploy --cron "0 3 * * *"             # deployment 'latentlab/nightly', runs at 03:00
    prefect deployment run latentlab/nightly -p force_stage=grpo   # an extra run, any parameters

This process stays up and executes the scheduled and requested runs in this checkout.
"""

import argparse
from pathlib import Path

from flows.pipeline import pipeline


def main() -> None:
    parser = argparse.ArgumentParser(description="serve the latentlab flow on a schedule")
    parser.add_argument("--name", default="nightly", help="deployment name")
    parser.add_argument("--cron", default="0 3 * * *", help="cron schedule (server time zone: UTC)")
    parser.add_argument("--repo", default=".", help="the project checkout the runs work in")
    parser.add_argument("--push", action="store_true", help="dvc push at the end of every scheduled run")
    parser.add_argument("--jobs", "-j", type=int, default=1, help="stages run at once at most (flows.pipeline)")
    args = parser.parse_args()
    pipeline.serve(
        name=args.name,
        cron=args.cron,
        parameters={"repo": str(Path(args.repo).resolve()), "push_at_end": args.push, "jobs": args.jobs},
        description="latentlab DAG: dvc repro of each stage once its inputs are ready, metrics and report as artifacts",
        tags=["latentlab"],
    )


if __name__ == "__main__":
    main()
