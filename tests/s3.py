"""A local S3 API for tests and benchmarks: moto in server mode on 127.0.0.1 (as DVC's own S3 tests run it).

Anything that speaks S3 reaches it with the endpoint URL and the throwaway credentials below: DVC's
`endpointurl`, s3fs/fsspec's `endpoint_url` (also read from AWS_ENDPOINT_URL_S3), boto3.
"""

import logging
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ruamel.yaml import YAML

from tests.dag import Project, make_project

# moto accepts any credentials; environment variables take precedence over a user's ~/.aws files
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


@contextmanager
def moto_server() -> Iterator[str]:
    """An S3 API served by moto on a free port of 127.0.0.1, in a thread of this process; yields its URL."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # not a line per request
    server = ThreadedMotoServer("127.0.0.1", 0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()


def s3_client(endpoint: str):
    import boto3

    return boto3.client(
        "s3",
        endpoint_url=endpoint,
        aws_access_key_id=CREDENTIALS["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
        region_name=CREDENTIALS["AWS_DEFAULT_REGION"],
    )


def bucket_objects(endpoint: str, bucket: str) -> dict[str, int]:
    """Every object in `bucket`: key -> size in bytes."""
    pages = s3_client(endpoint).get_paginator("list_objects_v2").paginate(Bucket=bucket)
    return {item["Key"]: item["Size"] for page in pages for item in page.get("Contents", [])}


def tree_bytes(root: Path, paths: list[str]) -> dict[str, bytes]:
    """The content of every file under `paths` (relative to `root`), by relative path."""
    files = {}
    for path in paths:
        for file in sorted((root / path).rglob("*")):
            if file.is_file():
                files[str(file.relative_to(root))] = file.read_bytes()
    return files


def first_stages_project(directory: Path, home: Path, stages: list[str]) -> Project:
    """tests.dag's tiny project with the DAG cut down to `stages` (committed), S3 credentials in its env."""
    project = make_project(directory, home)
    yaml = YAML()
    pipeline = yaml.load((project.root / "dvc.yaml").read_text())
    pipeline["stages"] = {name: pipeline["stages"][name] for name in stages}
    with (project.root / "dvc.yaml").open("w") as handle:
        yaml.dump(pipeline, handle)
    project.run("git", "commit", "-qam", f"the DAG cut down to {', '.join(stages)}")
    project.env.update(CREDENTIALS)  # credentials come from the environment, never from .dvc/config
    return project


def wipe_local(project: Project, outputs: list[str]) -> None:
    """The DVC cache and the workspace outputs gone: only a remote can bring them back."""
    shutil.rmtree(project.root / ".dvc" / "cache")
    for path in outputs:
        target = project.root / path
        if target.is_dir():
            shutil.rmtree(target)
        else:
            target.unlink()
