"""The S3 round trip of a DVC remote: `dvc push`, then `dvc pull` into an empty cache, of the tiny DAG's outputs.

    LATENTLAB_THREADS=1 python benchmarks/s3_roundtrip.py             # JSON on stdout, about a minute on 2 cores
    LATENTLAB_THREADS=1 python benchmarks/s3_roundtrip.py --repeats 1

The project is tests/test_s3_remote.py's: tests/dag.py's tiny params, the DAG cut down to synth,
grid and base (Parquet tables, a Zarr store, a model directory), reproduced once. The S3 API is moto
in server mode on 127.0.0.1, in a thread of this process, so the numbers are DVC + s3fs + HTTP on
loopback, not a network; a local-directory remote is timed the same way beside it, as the floor.
Each repeat pushes to a new empty prefix (every object uploaded), wipes the DVC cache and the
outputs, pulls them back and checks every output byte for byte.
"""

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.s3 import bucket_objects, first_stages_project, moto_server, s3_client, tree_bytes, wipe_local  # noqa: E402

STAGES = ["synth", "grid", "base"]
OUTPUTS = ["data/synth", "data/grid", "models/base", "plots/base.csv", "dvclive/base"]
BUCKET = "latentlab"


def timed(project, *command: str) -> float:
    started = time.perf_counter()
    project.run(*command)
    return time.perf_counter() - started


def roundtrip(project, remote: str, before: dict[str, bytes]) -> dict:
    """Push everything to `remote`, wipe the local copies, pull them back: seconds of each, checked."""
    push = timed(project, "dvc", "push", "-r", remote)
    wipe_local(project, OUTPUTS)
    pull = timed(project, "dvc", "pull", "-r", remote)
    if tree_bytes(project.root, OUTPUTS) != before:
        raise AssertionError(f"{remote}: the pulled outputs differ from the pushed ones")
    return {"push_s": round(push, 3), "pull_s": round(pull, 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as scratch, moto_server() as endpoint:
        scratch = Path(scratch)
        s3_client(endpoint).create_bucket(Bucket=BUCKET)
        (scratch / "project").mkdir()
        project = first_stages_project(scratch / "project", scratch, STAGES)
        project.run("dvc", "repro")
        before = tree_bytes(project.root, OUTPUTS)
        runs = {"s3": [], "local": []}
        for repeat in range(args.repeats):
            prefix = f"run{repeat}"
            project.run("dvc", "remote", "add", "--local", "-f", "s3", f"s3://{BUCKET}/{prefix}")
            project.run("dvc", "remote", "modify", "--local", "s3", "endpointurl", endpoint)
            project.run("dvc", "remote", "add", "--local", "-f", "local", str(scratch / "remotes" / prefix))
            runs["s3"].append(roundtrip(project, "s3", before))
            runs["local"].append(roundtrip(project, "local", before))
        objects = {key: size for key, size in bucket_objects(endpoint, BUCKET).items() if key.startswith("run0/")}
        result = {
            "what": "dvc push, then dvc pull into an empty cache, of the tiny DAG's synth + grid + base outputs",
            "s3": "moto server on 127.0.0.1 (loopback, in-process thread), dvc-s3 + s3fs",
            "output_files": len(before),
            "output_bytes": sum(len(content) for content in before.values()),
            "objects_pushed": len(objects),
            "bytes_pushed": sum(objects.values()),
            "repeats": args.repeats,
            **{
                f"{remote}_{step}_median_s": statistics.median(run[f"{step}_s"] for run in timings)
                for remote, timings in runs.items()
                for step in ("push", "pull")
            },
            "runs": runs,
            "cpus": os.cpu_count(),
            "threads": os.environ.get("LATENTLAB_THREADS"),
            "python": platform.python_version(),
        }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
