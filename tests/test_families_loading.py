"""Loading that respects a real checkpoint (issue 27, point 1), on real tokenizers around real-shaped architectures
(tests/families.py): a pad token always, never a stop token where a spare special token exists; the vocabulary
never shrunk and a new token's row the mean of the old ones; the checkpoint's special tokens kept; every eos id
of generation_config.json a stop id; GPT-2's unk (= eos) not "unknown"; `latentlab label` on GPT-2 and Llama 3."""

import numpy as np
import pytest
import torch

from latentlab.cli import main as cli
from latentlab.hidden.store import open_store
from latentlab.lm import modeling
from latentlab.lm.padding import pad_sequences
from latentlab.lm.tokenizer import INJECT
from tests.families import QWEN_VOCAB, build_family, require_family

ALL = ["qwen2", "qwen3", "llama3", "gpt2"]


@pytest.fixture(scope="module")
def family_dir(tmp_path_factory):
    """family name -> its saved checkpoint, built once per module (read-only: tests load copies in memory)."""
    built = {}

    def get(name):
        if name not in built:
            require_family(name)
            built[name] = build_family(name, tmp_path_factory.mktemp(name))
        return built[name]

    return get


@pytest.mark.parametrize("name", ALL)
def test_every_family_loads_with_a_pad_token_that_is_not_a_stop_token_where_a_spare_exists(family_dir, name):
    model, tokenizer = modeling.load_lm(family_dir(name))
    pad = tokenizer.pad_token_id
    assert pad is not None and model.config.pad_token_id == pad and tokenizer.padding_side == "left"
    assert pad < model.get_input_embeddings().num_embeddings
    stops = modeling.stop_token_ids(model, tokenizer)
    if name == "llama3":  # no pad of its own: a reserved special token, not <|end_of_text|> or <|eot_id|>
        assert tokenizer.pad_token.startswith("<|reserved_special_token_") and pad not in stops
    elif name == "gpt2":  # one special token in all: pad = eos, harmless because padding is by mask
        assert pad == tokenizer.eos_token_id
    else:  # Qwen's own pad <|endoftext|>, not its eos <|im_end|>
        assert tokenizer.pad_token == "<|endoftext|>" and pad != tokenizer.eos_token_id
    # padding is by mask, never by the pad id's value: a real pad-id (eos) token keeps its mask of 1
    ids, mask = pad_sequences([[pad, 11, pad], [12]], pad, left=True)
    assert ids.tolist() == [[pad, 11, pad], [pad, pad, 12]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    with torch.no_grad():  # and the model runs a left-padded batch
        assert model(input_ids=ids, attention_mask=mask).logits.shape[:2] == (2, 3)


@pytest.mark.parametrize("name", ["qwen2", "qwen3"])
def test_prepare_pretrained_keeps_qwens_padded_vocabulary_and_gives_inject_a_new_mean_row(family_dir, name):
    model, tokenizer = modeling.load_lm(family_dir(name))
    tokens = len(tokenizer)  # 151,669 tokens in a 151,936-row matrix
    weight = model.get_input_embeddings().weight
    mean, old = weight[:tokens].float().mean(0), weight.detach().clone()
    modeling.prepare_pretrained(model, tokenizer)
    inject = tokenizer.convert_tokens_to_ids(INJECT)
    assert inject == tokens and len(tokenizer) == tokens + 1  # a new id, not an existing token's
    assert model.get_input_embeddings().num_embeddings == model.config.vocab_size == QWEN_VOCAB  # never shrunk
    weight = model.get_input_embeddings().weight
    assert torch.allclose(weight[inject], mean, atol=1e-6)
    assert torch.equal(weight[:inject], old[:inject]) and torch.equal(weight[inject + 1 :], old[inject + 1 :])
    assert model.get_output_embeddings().weight is weight  # still tied


@pytest.mark.parametrize("name", ["llama3", "gpt2"])
def test_prepare_pretrained_grows_a_full_vocabulary_by_mean_rows_tied_or_not(family_dir, name):
    model, tokenizer = modeling.load_lm(family_dir(name))
    rows = model.get_input_embeddings().num_embeddings
    assert len(tokenizer) == rows
    means = [model.get_input_embeddings().weight.float().mean(0), model.get_output_embeddings().weight.float().mean(0)]
    modeling.prepare_pretrained(model, tokenizer)
    inject = tokenizer.convert_tokens_to_ids(INJECT)
    assert inject == rows and model.get_input_embeddings().num_embeddings == model.config.vocab_size == rows + 1
    assert torch.allclose(model.get_input_embeddings().weight[inject], means[0], atol=1e-6)
    assert torch.allclose(model.get_output_embeddings().weight[inject], means[1], atol=1e-6)  # untied lm_head too


def test_qwens_special_tokens_stay_special_beside_inject(family_dir, tmp_path):
    model, tokenizer = modeling.load_lm(family_dir("qwen3"))
    before = set(tokenizer.all_special_ids)
    im_start = tokenizer.convert_tokens_to_ids("<|im_start|>")
    assert im_start in before
    modeling.prepare_pretrained(model, tokenizer)
    inject = tokenizer.convert_tokens_to_ids(INJECT)
    assert set(tokenizer.all_special_ids) == before | {inject}
    modeling.save_lm(model, tokenizer, tmp_path, source="qwen3")  # as the base stage saves it
    model, tokenizer = modeling.load_lm(tmp_path)
    assert {im_start, inject} <= set(tokenizer.all_special_ids)
    assert tokenizer.decode([9707, inject, im_start, 1879], skip_special_tokens=True) == "Hello world"
    prepare = modeling.prepare_pretrained  # a second pass adds nothing
    prepare(model, tokenizer)
    assert tokenizer.convert_tokens_to_ids(INJECT) == inject and len(tokenizer) == inject + 1


@pytest.mark.parametrize(
    ("name", "stops"),
    [("qwen2", [151645, 151643]), ("qwen3", [151645, 151643]), ("llama3", [128001, 128008, 128009]), ("gpt2", [50256])],
)
def test_stop_ids_are_eos_and_every_eos_of_the_generation_config(family_dir, name, stops):
    model, tokenizer = modeling.load_lm(family_dir(name))
    assert modeling.stop_token_ids(model, tokenizer) == stops
    assert modeling.stop_token_ids(model, tokenizer)[0] == tokenizer.eos_token_id


def label(model_dir, prompts, out):
    cli(["label", "--model", str(model_dir), "--prompts", str(prompts), "--out", str(out)]
        + ["--layers", "-1", "--tokens", "1", "--batch-size", "2"])  # fmt: skip


def test_label_on_gpt2_reads_endoftext_in_a_prompt_as_a_token_not_as_unknown(family_dir, tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("Hello world<|endoftext|>\n<|endoftext|>The answer is\nshort\n")
    label(family_dir("gpt2"), prompts, tmp_path / "gpt2.zarr")
    store = open_store(tmp_path / "gpt2.zarr")
    assert store["pooled"].shape == (3, 1, 32)
    assert store["n_positions"][:].tolist() == [3, 4, 1]  # <|endoftext|> is one position (50256)
    assert torch.isfinite(torch.from_numpy(store["pooled"][:].astype("float32"))).all()


def test_label_on_llama3_without_a_pad_token_pads_its_batches(family_dir, tmp_path):
    model_dir = family_dir("llama3")
    prompts = tmp_path / "p.txt"
    prompts.write_text("Hello world\nThe quick brown fox jumps\nHi\n")
    label(model_dir, prompts, tmp_path / "llama3.zarr")
    store = open_store(tmp_path / "llama3.zarr")
    assert store["pooled"].shape == (3, 1, 32)
    # left padding changed nothing: the batch's rows equal each prompt labelled alone
    (tmp_path / "one.txt").write_text("Hi\n")
    label(model_dir, tmp_path / "one.txt", tmp_path / "one.zarr")
    alone = open_store(tmp_path / "one.zarr")["pooled"][0]
    assert torch.allclose(torch.from_numpy(store["pooled"][2]).float(), torch.from_numpy(alone).float(), atol=1e-5)


def test_serve_on_llama3_without_a_pad_token_answers_a_padded_batch(family_dir):
    """The issue's report: /health said 200 and every /embed answered 500 (the pad id None in lm/padding.py)."""
    from tests.test_serve import call, start_server

    process, url = start_server(family_dir("llama3"), "--layers", "-1")
    try:
        assert call(url, "/health")[0] == 200
        status, answer = call(url, "/embed", {"prompts": ["Hello world", "The quick brown fox jumps"]})
        assert status == 200, answer
        assert np.asarray(answer["pooled"]).shape == (2, 1, 32)
    finally:
        process.terminate()
        process.wait(timeout=10)
