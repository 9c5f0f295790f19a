"""Hidden-state stores on object storage: `latentlab label --out s3://...` and the readers, against moto on 127.0.0.1.

A store at a URL must hold exactly the bytes of the same run written locally, read back the same
through every reader, and resume after a kill like a local one (labelling.py's module doc).
"""

import json
import os
import signal
import subprocess
import sys
import time

import fsspec
import numpy as np
import polars as pl
import pytest

from latentlab.cli import main as cli
from latentlab.hidden.dataset import StoreDataset, pooled_vectors
from latentlab.hidden.npz import export_npz
from latentlab.hidden.store import open_store, read_parquet
from tests.label_fixtures import ENV, REPO, save_model, tree_bytes
from tests.s3 import CREDENTIALS, moto_server, s3_client

BUCKET = "stores"
OPTIONS = ["--layers", "0", "1", "-1", "--tokens", "6", "--store-tokens", "--batch-size", "2", "--shard-rows", "4"]


@pytest.fixture(scope="module")
def s3_env():
    """The moto server, a bucket, and the standard AWS variables that point fsspec (s3fs) at it."""
    with moto_server() as endpoint:
        s3_client(endpoint).create_bucket(Bucket=BUCKET)
        env = {**CREDENTIALS, "AWS_ENDPOINT_URL": endpoint}
        saved = {key: os.environ.get(key) for key in env}
        os.environ.update(env)
        try:
            yield env
        finally:
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key)
                else:
                    os.environ[key] = value


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tiny_lm):
    return save_model(tiny_lm, tmp_path_factory.mktemp("tiny"))


def label_cli(model_dir, prompts, out):
    cli(["label", "--model", str(model_dir), "--prompts", str(prompts), "--out", str(out), *OPTIONS])


def object_bytes(url: str) -> dict[str, bytes]:
    """Every object under `url` by relative key (as tree_bytes for a directory)."""
    fs, root = fsspec.core.url_to_fs(url)
    fs.invalidate_cache()
    return {path[len(root) + 1 :]: fs.cat_file(path) for path in sorted(fs.find(root))}


def test_label_to_s3_equals_the_local_store_through_every_reader(s3_env, model_dir, tmp_path, capsys):
    (tmp_path / "p.txt").write_text("\n".join(f"{a}+{b}=" for a in range(3) for b in range(3)))
    local, url = tmp_path / "p.zarr", f"s3://{BUCKET}/one/p.zarr"
    label_cli(model_dir, tmp_path / "p.txt", local)
    label_cli(model_dir, tmp_path / "p.txt", url)

    assert object_bytes(url) == tree_bytes(local)  # every shard file and zarr.json, byte for byte
    assert sorted(object_bytes(f"s3://{BUCKET}/one")) == sorted(
        ["p.parquet", *[f"p.zarr/{f}" for f in tree_bytes(local)]]
    )
    assert read_parquet(f"s3://{BUCKET}/one/p.parquet").equals(pl.read_parquet(tmp_path / "p.parquet"))
    assert open_store(url).attrs["complete"] is True

    np.testing.assert_array_equal(pooled_vectors(url, -1), pooled_vectors(local, -1))
    remote_tokens = StoreDataset(url, [0, -1], kind="tokens", shuffle=False, table=f"s3://{BUCKET}/one/p.parquet")
    local_tokens = StoreDataset(local, [0, -1], kind="tokens", shuffle=False, table=tmp_path / "p.parquet")
    for a, b in zip(remote_tokens, local_tokens, strict=True):
        assert a["id"] == b["id"] and a["position"] == b["position"]
        np.testing.assert_array_equal(a["x"].numpy(), b["x"].numpy())

    export_npz(url, tmp_path / "remote.npz", f"s3://{BUCKET}/one/p.parquet")
    export_npz(local, tmp_path / "local.npz", tmp_path / "p.parquet")
    assert (tmp_path / "remote.npz").read_bytes() == (tmp_path / "local.npz").read_bytes()

    capsys.readouterr()
    cli(["info", url, "--json"])
    report = json.loads(capsys.readouterr().out)
    cli(["info", str(local), "--json"])
    assert report == json.loads(capsys.readouterr().out) | {"path": url}


def test_a_killed_s3_run_is_refused_then_resumes_to_the_uninterrupted_store(s3_env, model_dir, tmp_path, capsys):
    (tmp_path / "p.txt").write_text("\n".join(f"{a}+{b}=" for a in range(20) for b in range(20)))  # 100 shards
    reference, url = tmp_path / "reference" / "p.zarr", f"s3://{BUCKET}/killed/p.zarr"
    label_cli(model_dir, tmp_path / "p.txt", reference)

    command = [sys.executable, "-m", "latentlab.cli", "label", "--model", str(model_dir)]
    command += ["--prompts", str(tmp_path / "p.txt"), "--out", url, *OPTIONS]
    env = {**ENV, **s3_env}
    process = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    fs, _ = fsspec.core.url_to_fs(url)
    done, deadline = f"{BUCKET}/killed/.p.zarr.work/done", time.monotonic() + 120
    while True:
        fs.invalidate_cache()
        if len(fs.find(done)) >= 3:
            break
        assert process.poll() is None, "the run ended before it could be killed:\n" + process.stdout.read()[-2000:]
        assert time.monotonic() < deadline
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()
    fs.invalidate_cache()
    shards_done = len(fs.find(done))
    assert shards_done < 100, "killed too late to test a resume"

    with pytest.raises(ValueError, match="incomplete"):  # in place, but no reader takes it
        open_store(url)
    assert not fs.exists(f"{BUCKET}/killed/p.parquet")
    capsys.readouterr()
    cli(["info", url, "--json"])
    report = json.loads(capsys.readouterr().out)
    assert report["complete"] is False and report["shards_done"] == shards_done and report["rows"] == 400

    label_cli(model_dir, tmp_path / "p.txt", url)
    assert f"resuming, {shards_done} of 100 shard(s) already done" in capsys.readouterr().out
    assert object_bytes(url) == tree_bytes(reference)
    assert read_parquet(f"s3://{BUCKET}/killed/p.parquet").equals(pl.read_parquet(reference.with_suffix(".parquet")))
    assert sorted(object_bytes(f"s3://{BUCKET}/killed")) == sorted(
        ["p.parquet", *[f"p.zarr/{f}" for f in tree_bytes(reference)]]
    )  # the work prefix is gone
