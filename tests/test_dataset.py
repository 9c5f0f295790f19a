"""StoreDataset: the samples of a real labelled store, shuffled by chunk, normalised, through DataLoader workers."""

import shutil

import numpy as np
import polars as pl
import pytest
import torch
from torch.utils.data import DataLoader

from latentlab.cli import main as cli
from latentlab.hidden.dataset import StoreDataset, normalization, pooled_vectors
from latentlab.hidden.store import layer_position, open_store
from tests.label_fixtures import save_model

CHUNK = 4  # --batch-size: the store's chunk along N


@pytest.fixture(scope="module")
def labelled(tmp_path_factory, tiny_lm):
    """30 prompts labelled by `latentlab label`: generated 6 tokens, layers 0, 1, -1, per-token states kept."""
    root = tmp_path_factory.mktemp("dataset")
    model = save_model(tiny_lm, root / "model")
    (root / "p.txt").write_text("\n".join(f"{a}+{a + 3}=" for a in range(30)))
    options = ["--layers", "0", "1", "-1", "--tokens", "6", "--temperature", "2", "--store-tokens"]
    options += ["--batch-size", str(CHUNK), "--shard-rows", "8"]
    cli(["label", "--model", str(model), "--prompts", str(root / "p.txt"), "--out", str(root / "p.zarr"), *options])
    return root / "p.zarr"


def samples(dataset):
    return list(iter(dataset))


def test_pooled_in_store_order_are_the_stored_vectors(labelled):
    store = open_store(labelled)
    got = samples(StoreDataset(labelled, layers=[-1, 0], shuffle=False))
    assert len(got) == 30 and [s["id"] for s in got] == store["ids"][:].tolist()
    np.testing.assert_array_equal(np.stack([s["x"].numpy() for s in got]), store["pooled"][:][:, [2, 0]])


def test_tokens_are_every_pooled_position_and_no_padding(labelled):
    store = open_store(labelled)
    tokens, counts = store["tokens"][:].astype(np.float32), store["n_positions"][:]
    data = StoreDataset(labelled, layers=[1], kind="tokens", shuffle=False)
    got = samples(data)
    assert len(got) == len(data) == counts.sum() and (counts < 6).any()  # some rows ended early
    assert [(s["id"], s["position"]) for s in got] == [(i, t) for i in range(30) for t in range(counts[i])]
    for s in got[:40]:
        np.testing.assert_array_equal(s["x"].numpy(), tokens[s["id"], s["position"], [1]])


def test_shuffle_visits_whole_chunks_in_a_new_order_each_epoch(labelled):
    data = StoreDataset(labelled, seed=3)
    first = [s["id"] for s in samples(data)]
    assert sorted(first) == list(range(30)) and first != list(range(30))
    chunks = [i // CHUNK for i in first]
    runs = [c for i, c in enumerate(chunks) if i == 0 or c != chunks[i - 1]]
    assert sorted(runs) == list(range(8))  # each chunk read once, its rows together: sequential reads
    assert [s["id"] for s in samples(data)] == first  # a function of (seed, epoch) only
    data.set_epoch(1)
    assert [s["id"] for s in samples(data)] != first


def test_two_workers_give_every_sample_once(labelled):
    data = StoreDataset(labelled, kind="tokens", batch_size=16, seed=1)
    alone = torch.cat([b["id"] * 10 + b["position"] for b in DataLoader(data, batch_size=None)])
    workers = DataLoader(data, batch_size=None, num_workers=2)
    batches = list(workers)
    both = torch.cat([b["id"] * 10 + b["position"] for b in batches])
    assert len(both) == len(data) and sorted(both.tolist()) == sorted(alone.tolist()) == sorted(set(alone.tolist()))
    assert all(b["x"].shape[1:] == (3, 32) and b["x"].dtype == torch.float32 for b in batches)


def test_normalisation_is_computed_once_kept_in_the_attributes_and_centres_the_states(labelled, tmp_path):
    untouched = (labelled / "zarr.json").read_bytes()
    mean, std = normalization(labelled, "tokens", save=False)
    assert (labelled / "zarr.json").read_bytes() == untouched
    store = open_store(labelled)
    tokens, counts = store["tokens"][:].astype(np.float64), store["n_positions"][:]
    x = tokens[np.arange(6)[None] < counts[:, None]]  # (samples, L, H)
    np.testing.assert_allclose(mean, x.mean(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(std, np.sqrt(((x - x.mean(0)) ** 2).sum(2).mean(0) / 32), rtol=1e-5)

    data = StoreDataset(labelled, kind="tokens", normalize=True, batch_size=10_000, shuffle=False)
    assert (labelled / "zarr.json").read_bytes() == untouched  # reading never changes a store by default
    (batch,) = samples(data)
    normed = batch["x"].double()
    np.testing.assert_allclose(normed.mean(0), 0, atol=1e-5)
    np.testing.assert_allclose((normed**2).sum(2).mean(0), 32, rtol=1e-4)  # E ||x||^2 = H

    StoreDataset(labelled, kind="tokens", normalize=True, save_stats=True)  # asked: kept in the attributes
    saved = open_store(labelled).attrs["normalization"]["tokens"]
    assert saved["samples"] == counts.sum() and np.allclose(saved["std"], std)
    assert "pooled" not in open_store(labelled).attrs["normalization"]
    again = normalization(labelled, "tokens")  # read back from the attributes
    np.testing.assert_array_equal(again[0], mean)
    np.testing.assert_array_equal(again[1], std)


def test_columns_of_the_row_table_travel_with_their_samples(labelled):
    table = pl.read_parquet(labelled.with_suffix(".parquet"))
    data = StoreDataset(labelled, table=labelled.with_suffix(".parquet"), columns=["prompt", "text_generated"])
    for s in samples(data):
        assert s["prompt"] == table["prompt"][s["id"]] and s["text_generated"] == table["text_generated"][s["id"]]


def test_what_a_store_cannot_give_is_refused(labelled, tmp_path):
    with pytest.raises(ValueError, match=r"layer 5 is not in .* \(it holds layers \[0, 1, -1\]\)"):
        StoreDataset(labelled, layers=[5])
    with pytest.raises(ValueError, match="without the row table"):
        StoreDataset(labelled, columns=["prompt"])
    pl.DataFrame({"id": list(range(1, 31)), "prompt": ["x"] * 30}).write_parquet(tmp_path / "other.parquet")
    with pytest.raises(ValueError, match="out of step"):
        StoreDataset(labelled, table=tmp_path / "other.parquet", columns=["prompt"])


def test_pooled_vectors_are_the_stored_array_bit_for_bit(labelled):
    # what the policy stage and the NLA table read through the dataset: exactly the store's pooled array
    store = open_store(labelled)
    for layer in (0, 1, -1):
        mine, theirs = pooled_vectors(labelled, layer), store["pooled"][:, layer_position(store, layer)]
        assert mine.dtype == theirs.dtype == np.float32 and mine.shape == theirs.shape == (30, 32)
        assert mine.tobytes() == theirs.tobytes()


def test_a_damaged_chunk_is_named_by_store_and_array_when_read(labelled, tmp_path):
    damaged = tmp_path / "p.zarr"
    shutil.copytree(labelled, damaged)
    for array in ("pooled/c/1/0/0", "tokens/c/2/0/0/0"):
        data = bytearray((damaged / array).read_bytes())
        middle = len(data) // 2
        data[middle - 8 : middle + 8] = bytes(b ^ 0xFF for b in data[middle - 8 : middle + 8])
        (damaged / array).write_bytes(bytes(data))
    # old: the pooled vectors came back wrong, silently; a damaged index: a checksum error naming nothing
    with pytest.raises(ValueError, match=rf"^{damaged}: array 'pooled' is damaged: its file {damaged}/pooled/c/1/0/0 "):
        pooled_vectors(damaged, -1)
    with pytest.raises(
        ValueError, match=rf"^{damaged}: array 'tokens' is damaged: .*tokens/c/2/0/0/0 \(rows 16\.\.24\)"
    ):
        open_store(damaged)["tokens"][:]
    assert open_store(damaged)["ids"][:].tolist() == list(range(30))  # the rest reads as before
