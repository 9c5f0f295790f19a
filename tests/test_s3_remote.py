"""A DVC remote on S3: push, pull and experiments through an S3 API served on 127.0.0.1 by moto.

The commands are the README's (section "A DVC remote on S3"), run on a fresh tiny project of its own: the DAG
cut down to its first stages (synth, grid, base: Parquet tables, a Zarr store, a model directory),
so that the plain commands (`dvc push`, `dvc pull`, `dvc status`) cover the whole of it.
"""

import json

import pytest

from tests.s3 import bucket_objects, first_stages_project, moto_server, s3_client, tree_bytes, wipe_local

pytestmark = pytest.mark.slow
BUCKET = "latentlab"
STAGES = ["source", "synth", "grid", "base"]
OUTPUTS = ["models/source.json", "data/synth", "data/grid", "models/base", "plots/base.csv", "dvclive/base"]


@pytest.fixture(scope="module")
def s3_endpoint():
    with moto_server() as endpoint:
        s3_client(endpoint).create_bucket(Bucket=BUCKET)
        yield endpoint


@pytest.fixture(scope="module")
def project(tmp_path_factory, s3_endpoint):
    """A tiny project with `base` reproduced and the S3 remote committed in .dvc/config (a clone gets it)."""
    project = first_stages_project(tmp_path_factory.mktemp("s3project"), tmp_path_factory.mktemp("home"), STAGES)
    project.run("dvc", "repro")
    project.run("dvc", "remote", "add", "-d", "s3remote", f"s3://{BUCKET}/dvcstore")
    project.run("dvc", "remote", "modify", "s3remote", "endpointurl", s3_endpoint)
    project.run("git", "add", "-A")
    project.run("git", "commit", "-qm", "base reproduced; S3 remote")
    return project


def test_push_wipe_pull_gives_back_every_output(project, s3_endpoint):
    before = tree_bytes(project.root, OUTPUTS)
    assert len(before) > 10 and any(name.endswith("zarr.json") for name in before)  # tables, a store, a model

    project.run("dvc", "push")
    stored = bucket_objects(s3_endpoint, BUCKET)
    assert all(key.startswith("dvcstore/files/md5/") for key in stored)
    # every output file is an object (equal contents share one), plus a listing per directory output
    assert len({content for content in before.values()}) <= len(stored)
    assert sum(stored.values()) >= sum(len(content) for content in set(before.values()))

    wipe_local(project, OUTPUTS)  # nothing local is left to restore from
    assert set(project.status()) == set(STAGES)  # the outputs are gone ...

    project.run("dvc", "pull")
    assert tree_bytes(project.root, OUTPUTS) == before  # ... and back from S3, byte for byte
    assert project.status() == {}
    assert project.status("--cloud") == {}  # remote and cache agree


def test_experiment_push_and_pull_into_a_fresh_clone(project, s3_endpoint, tmp_path):
    origin = tmp_path / "origin.git"
    project.run("git", "init", "-q", "--bare", "-b", "main", str(origin))
    project.run("git", "remote", "add", "origin", str(origin))
    project.run("git", "push", "-q", "origin", "main")
    baseline = tree_bytes(project.root, OUTPUTS)
    try:
        project.run("dvc", "exp", "run", "-S", "synth.n_test=30", "--name", "fewer-tests")
        experiment = tree_bytes(project.root, OUTPUTS)
        assert experiment != baseline
        stored = bucket_objects(s3_endpoint, BUCKET)
        project.run("dvc", "exp", "push", "origin", "fewer-tests")  # git refs to origin, outputs to S3
        assert len(bucket_objects(s3_endpoint, BUCKET)) > len(stored)  # the experiment's new outputs
    finally:  # back to main: params and lock from git, outputs from the cache
        project.run("git", "reset", "-q", "--hard", "HEAD")
        project.run("dvc", "checkout", "--force")
        project.run("git", "remote", "remove", "origin")
    assert tree_bytes(project.root, OUTPUTS) == baseline

    clone = tmp_path / "clone"
    project.run("git", "clone", "-q", str(origin), str(clone))
    assert not (clone / ".dvc" / "cache").exists()  # all it has is git: the outputs can only come from S3
    listed = project.run("dvc", "exp", "list", "origin", cwd=clone).stdout
    assert "fewer-tests" in listed
    project.run("dvc", "exp", "pull", "origin", "fewer-tests", cwd=clone)  # git refs from origin, outputs from S3
    project.run("dvc", "exp", "apply", "fewer-tests", cwd=clone)
    assert tree_bytes(clone, OUTPUTS) == experiment
    assert project.status(cwd=clone) == {}
    diff = json.loads(project.run("dvc", "params", "diff", "main", "--json", cwd=clone).stdout)
    assert diff["params.yaml"]["synth.n_test"]["new"] == 30
