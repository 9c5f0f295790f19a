"""Reference NPZ import/export, and re-extraction from the command line (`latentlab extract`)."""

import io

import numpy as np
import polars as pl
import pytest

from latentlab.cli import main as cli
from latentlab.common.errors import InputError
from latentlab.hidden.extract import Extractor
from latentlab.hidden.labelling import LabelConfig, label, prepare
from latentlab.hidden.npz import REFERENCE_KEYS, export_npz, import_npz
from latentlab.hidden.store import open_store
from latentlab.lm.modeling import describe_model, load_lm
from tests.label_fixtures import save_model

N, T, H = 10, 6, 16


def reference_npz(path):
    rng = np.random.default_rng(0)
    arrays = {
        "obs": rng.integers(0, 255, (N, 8, 8, 3), dtype=np.uint8),
        "next_obs": rng.integers(0, 255, (N, 8, 8, 3), dtype=np.uint8),
        "action": rng.integers(0, 4, N),
        "reward": rng.normal(size=N).astype(np.float32),
        "done": rng.random(N) < 0.3,
        "log_prob": rng.normal(size=N).astype(np.float32),
        "text_generated": np.array([f"move {i} left" * (i % 3) for i in range(N)]),
        "hidden_state": rng.normal(size=(N, T, H)).astype(np.float32),
    }
    np.savez(path, **arrays)
    return arrays


def test_reference_npz_round_trips_through_a_store(tmp_path):
    original = reference_npz(tmp_path / "ref.npz")
    assert (
        import_npz(tmp_path / "ref.npz", tmp_path / "ref.zarr", tmp_path / "ref.parquet", batch_rows=4, shard_rows=8)
        == N
    )
    store = open_store(tmp_path / "ref.zarr")
    assert store["tokens"].shape == (N, T, 1, H) and store["tokens"].dtype == np.float16
    np.testing.assert_allclose(store["pooled"][:, 0], original["hidden_state"].mean(1), atol=1e-6)
    assert store["obs"].shape == (N, 8, 8, 3) and store.attrs["mode"] == "imported"

    export_npz(tmp_path / "ref.zarr", tmp_path / "back.npz", tmp_path / "ref.parquet")
    with np.load(tmp_path / "back.npz", allow_pickle=False) as back:
        assert set(REFERENCE_KEYS) <= set(back.files)
        for key in REFERENCE_KEYS:
            assert back[key].dtype == original[key].dtype, key
            if key == "hidden_state":  # stored as float16: half the bytes, 3 significant digits
                np.testing.assert_allclose(back[key], original[key], rtol=1e-3, atol=1e-3)
            else:
                np.testing.assert_array_equal(back[key], original[key])


def test_an_object_array_is_refused_not_unpickled(tmp_path):
    np.savez(
        tmp_path / "pickled.npz",
        hidden_state=np.zeros((2, 1, 4), np.float32),
        text_generated=np.array(["a", None], dtype=object),
    )
    with pytest.raises(InputError, match="text_generated is an object array, which needs pickle"):
        import_npz(tmp_path / "pickled.npz", tmp_path / "out.zarr")
    assert not (tmp_path / "out.zarr").exists()


def _npz(**arrays):
    def write(path):
        np.savez(path, **arrays)

    return write


def _bytes(content: bytes):
    return lambda path: path.write_bytes(content)


def _npy_bytes() -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, np.zeros(3))
    return buffer.getvalue()


BAD_FILES = {
    "1-D hidden_state": (_npz(hidden_state=np.zeros(4, np.float32)), "hidden_state must be (N, T, H) or (N, H)"),
    "text hidden_state": (_npz(hidden_state=np.array([["a", "b"]])), "hidden_state must be numeric"),
    "empty hidden_state": (_npz(hidden_state=np.zeros((0, 3, 4), np.float32)), "not empty, got shape"),
    "NaN state": (_npz(hidden_state=np.full((2, 1, 4), np.nan, np.float32)), "NaN or inf values in 2 rows"),
    "n_positions > T": (
        _npz(hidden_state=np.zeros((2, 3, 4), np.float32), n_positions=np.array([3, 5])),
        "n_positions must lie in 1..3 (hidden_state's T); rows [1] hold [5]",
    ),
    "n_positions < 1": (
        _npz(hidden_state=np.zeros((2, 3, 4), np.float32), n_positions=np.array([-1, 2])),
        "rows [0] hold [-1]",
    ),
    "float n_positions": (
        _npz(hidden_state=np.zeros((2, 3, 4), np.float32), n_positions=np.array([1.5, 2.0])),
        "n_positions must be integers",
    ),
    "rows differ": (
        _npz(hidden_state=np.zeros((2, 3, 4), np.float32), reward=np.zeros(3)),
        "these do not: {'reward': (3,)}",
    ),
    "no hidden_state": (_npz(obs=np.zeros((2, 3))), "has no hidden_state (it has ['obs'])"),
    "a .npy file": (_bytes(_npy_bytes()), "is a .npy file"),
    "a pickle": (_bytes(b"\x80\x05\x95\x10\x00\x00\x00"), "is not an .npz archive"),
    "a text file": (_bytes(b"hidden_state,1,2\n"), "is not an .npz archive"),
    "a damaged zip": (_bytes(b"PK\x03\x04 truncated"), "is a damaged .npz archive"),
}


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_cli_npz_import_names_the_file_and_what_is_wrong(case, tmp_path, capsys):
    write, message = BAD_FILES[case]
    path = tmp_path / "input.npz"
    write(path)
    with pytest.raises(SystemExit) as exit_:
        cli(["npz", "import", str(path), str(tmp_path / "out.zarr"), "--table", str(tmp_path / "out.parquet")])
    err = capsys.readouterr().err
    assert exit_.value.code == 1 and err.startswith(f"error: {path}") and len(err.strip().splitlines()) == 1
    assert message in err, err
    assert not (tmp_path / "out.zarr").exists() and not (tmp_path / "out.parquet").exists()


def test_cli_npz_import_of_a_missing_file_says_so(tmp_path, capsys):
    with pytest.raises(SystemExit):
        cli(["npz", "import", str(tmp_path / "nope.npz"), str(tmp_path / "out.zarr")])
    hint = "  (LATENTLAB_DEBUG=1 shows the traceback)"
    assert capsys.readouterr().err == f"error: {tmp_path / 'nope.npz'} does not exist{hint}\n"


@pytest.fixture(scope="module")
def labelled(tmp_path_factory, tiny_lm):
    """A generation-mode store with per-token states, and its row table, made by the library."""
    root = tmp_path_factory.mktemp("labelled")
    model_dir = save_model(tiny_lm, root / "model")
    model, tokenizer = load_lm(model_dir)
    cfg = LabelConfig(layers=[0, -1], tokens=6, temperature=2.0, store_tokens=True, batch_size=4, shard_rows=8)
    rows = pl.DataFrame({"id": list(range(100, 112)), "prompt": [f"{i}+{i}=" for i in range(12)]})
    extractor = Extractor(model, tokenizer, cfg)
    label(
        extractor,
        prepare(extractor, "rows", rows, cfg, 0, describe_model(model_dir)),
        root / "rows.zarr",
        root / "rows.parquet",
        root / "work",
    )
    return root


def test_a_labelled_store_exports_to_the_reference_keys(labelled, tmp_path):
    export_npz(labelled / "rows.zarr", tmp_path / "out.npz", labelled / "rows.parquet")
    store, rows = open_store(labelled / "rows.zarr"), pl.read_parquet(labelled / "rows.parquet")
    with np.load(tmp_path / "out.npz", allow_pickle=False) as out:
        hidden, counts = out["hidden_state"], out["n_positions"]
        assert hidden.shape == (12, 6, 32) and hidden.dtype == np.float32
        np.testing.assert_array_equal(hidden, store["tokens"][:, :, 1].astype(np.float32))
        np.testing.assert_allclose(hidden.sum(1) / counts[:, None], store["pooled"][:, 1], atol=2e-3)
        assert out["text_generated"].tolist() == rows["text_generated"].to_list()
        assert out["obs"].tolist() == rows["prompt"].to_list()
        np.testing.assert_array_equal(out["log_prob"], rows["log_prob"].to_numpy())


def test_cli_extract_re_extracts_generated_tokens_to_the_same_vectors(labelled, tmp_path):
    cli(
        [
            "extract",
            "--model",
            str(labelled / "model"),
            "--rows",
            str(labelled / "rows.parquet"),
            "--out",
            str(tmp_path / "again.zarr"),
            "--ids-column",
            "token_ids",
            "--layers",
            "0",
            "-1",
            "--batch-size",
            "5",
            "--shard-rows",
            "5",
            "--device",
            "cpu",
        ]
    )
    again, first = open_store(tmp_path / "again.zarr"), open_store(labelled / "rows.zarr")
    assert again.attrs["mode"] == "text"
    np.testing.assert_array_equal(again["n_positions"][:], first["n_positions"][:])
    np.testing.assert_allclose(again["pooled"][:], first["pooled"][:], atol=1e-5)


def test_cli_says_what_is_wrong_in_one_line(labelled, tmp_path, capsys):
    with pytest.raises(SystemExit):
        cli(
            [
                "extract",
                "--model",
                str(labelled / "model"),
                "--rows",
                str(labelled / "rows.parquet"),
                "--out",
                str(tmp_path / "x.zarr"),
                "--text-column",
                "nope",
            ]
        )
    assert "has no column 'nope'" in capsys.readouterr().err


def test_a_store_with_damaged_metadata_is_named(tmp_path):
    (tmp_path / "bad.zarr").mkdir()
    (tmp_path / "bad.zarr" / "zarr.json").write_text("garbage")
    with pytest.raises(ValueError, match=r"bad.zarr is not a readable Zarr store: .*bad.zarr/zarr.json"):
        open_store(tmp_path / "bad.zarr")
