"""The `latentlab` commands on real-family checkpoints (issue 27): Qwen2, Qwen3 (saved sharded), Llama 3 and GPT-2
built by tests/families.py around their real tokenizers. Per family: `label` in prompt mode (each row equal to the
prompt extracted alone: left padding changes nothing, also under GPT-2's learned absolute positions) and in
generate mode (the sampled tokens re-read teacher-forced by `extract` give the same vectors: the KV-cached
sampler and a full pass agree on every layout), `info` (plain and --verify), `serve` with a real request, and the
reference NPZ round trip (`npz export`, `npz import`)."""

import json

import numpy as np
import polars as pl
import pytest

from latentlab.cli import main as cli
from latentlab.hidden.extract import ExtractConfig, Extractor
from latentlab.hidden.store import open_store
from latentlab.lm.modeling import describe_model, load_lm
from tests.families import build_family, require_family
from tests.test_serve import call, start_server

FAMILIES = ["qwen2", "qwen3", "llama3", "gpt2"]
SHARDED = {"qwen3": "4MB"}  # one checkpoint saved as large hub checkpoints are: model-0000i-of-0000n + index
PROMPTS = [  # arithmetic, a grid text, a long sentence, non-ASCII: BPE lengths from 2 to 15 tokens
    "1+2=",
    "go to the green key: yellow key ahead, wall left",
    "13-4=",
    "The quick brown fox jumps over the lazy dog.",
    "Grüße, 世界! 7+19=",
]
LAYERS = ["--layers", "1", "-1"]
TOKENS = 4


@pytest.fixture(scope="module")
def labelled(tmp_path_factory):
    """family -> a directory with its checkpoint (model/), the prompts (p.txt) and both modes' stores, labelled
    by the command in batches of 2 (each batch padded): prompt.zarr, generate.zarr (+ .parquet tables)."""
    done = {}

    def get(name):
        if name not in done:
            require_family(name)
            root = tmp_path_factory.mktemp(name)
            model = build_family(name, root / "model", max_shard_size=SHARDED.get(name))
            (root / "p.txt").write_text("".join(p + "\n" for p in PROMPTS))
            label = ["label", "--model", str(model), "--prompts", str(root / "p.txt"), *LAYERS, "--batch-size", "2"]
            cli([*label, "--out", str(root / "prompt.zarr")])
            cli([*label, "--out", str(root / "generate.zarr"), "--tokens", str(TOKENS), "--store-tokens"])
            done[name] = root
        return done[name]

    return get


@pytest.mark.parametrize("name", FAMILIES)
def test_label_prompt_mode_gives_each_prompt_its_vectors_alone(labelled, name):
    root = labelled(name)
    model, tokenizer = load_lm(root / "model")
    store = open_store(root / "prompt.zarr")
    assert store.attrs["mode"] == "prompt" and store["pooled"].shape == (len(PROMPTS), 2, model.config.hidden_size)
    extractor = Extractor(model, tokenizer, ExtractConfig(layers=[1, -1]))
    for row, prompt in enumerate(PROMPTS):  # batches of 2, left-padded: each row as the prompt alone gives it
        alone = extractor([prompt])
        assert store["n_positions"][row] == alone.counts[0]  # the prompt as the raw format encodes it
        np.testing.assert_allclose(store["pooled"][row], alone.pooled[0].numpy(), atol=1e-5, err_msg=prompt)


@pytest.mark.parametrize("name", FAMILIES)
def test_label_generate_mode_agrees_with_extract_of_its_tokens(labelled, name, tmp_path):
    root = labelled(name)
    store, table = open_store(root / "generate.zarr"), pl.read_parquet(root / "generate.parquet")
    assert store.attrs["mode"] == "generate" and table["prompt"].to_list() == PROMPTS
    assert (
        table["n_tokens"].is_between(1, TOKENS).all()
        and store["n_positions"][:].tolist() == table["n_tokens"].to_list()
    )
    assert np.isfinite(store["pooled"][:]).all() and np.isfinite(table["log_prob"].to_numpy()).all()
    cli(["extract", "--model", str(root / "model"), "--rows", str(root / "generate.parquet"), "--out",
         str(tmp_path / "again.zarr"), "--ids-column", "token_ids", *LAYERS, "--batch-size", "2"])  # fmt: skip
    again = open_store(tmp_path / "again.zarr")
    np.testing.assert_array_equal(again["n_positions"][:], store["n_positions"][:])
    np.testing.assert_allclose(again["pooled"][:], store["pooled"][:], atol=1e-5)


@pytest.mark.parametrize("name", FAMILIES)
def test_info_describes_the_store_and_verifies_it(labelled, name, capsys):
    root = labelled(name)
    capsys.readouterr()
    cli(["info", str(root / "generate.zarr"), "--json"])
    report = json.loads(capsys.readouterr().out)
    assert report["complete"] is True and report["rows"] == len(PROMPTS) and report["mode"] == "generate"
    assert report["tokens"] == TOKENS and [layer["layer"] for layer in report["layers"]] == [1, -1]
    assert report["model"]["sha256"] == describe_model(root / "model")["sha256"]
    cli(["info", str(root / "generate.zarr"), "--verify"])
    assert capsys.readouterr().out.startswith(f"{root / 'generate.zarr'}: complete")


@pytest.mark.parametrize("name", FAMILIES)
def test_npz_export_then_import_round_trips_the_generated_states(labelled, name, tmp_path):
    root = labelled(name)
    store = open_store(root / "generate.zarr")
    cli(["npz", "export", str(root / "generate.zarr"), str(tmp_path / "out.npz"),
         "--table", str(root / "generate.parquet")])  # fmt: skip
    with np.load(tmp_path / "out.npz", allow_pickle=False) as out:
        arrays = {key: out[key] for key in out.files}
    tokens = store["tokens"][:, :, 1].astype(np.float32)  # layer -1, the last stored
    np.testing.assert_array_equal(arrays["hidden_state"], tokens)
    assert arrays["text_generated"].tolist() == pl.read_parquet(root / "generate.parquet")["text_generated"].to_list()
    cli(["npz", "import", str(tmp_path / "out.npz"), str(tmp_path / "back.zarr"),
         "--table", str(tmp_path / "back.parquet")])  # fmt: skip
    back = open_store(tmp_path / "back.zarr")
    np.testing.assert_array_equal(back["n_positions"][:], store["n_positions"][:])
    np.testing.assert_allclose(back["pooled"][:, 0], store["pooled"][:, 1], atol=2e-3)  # float16 per token
    np.testing.assert_array_equal(back["tokens"][:, :, 0], store["tokens"][:, :, 1])


@pytest.mark.parametrize("name", FAMILIES)
def test_serve_answers_a_batch_with_the_label_commands_vectors(labelled, name):
    root = labelled(name)
    process, url = start_server(root / "model", *LAYERS)
    try:
        status, health = call(url, "/health")
        assert status == 200 and health["hidden_size"] == open_store(root / "prompt.zarr")["pooled"].shape[2]
        status, answer = call(url, "/embed", {"prompts": PROMPTS[:3]})
        assert status == 200, answer
        np.testing.assert_allclose(answer["pooled"], open_store(root / "prompt.zarr")["pooled"][:3], atol=1e-5)
    finally:
        process.terminate()
        process.wait(timeout=10)
