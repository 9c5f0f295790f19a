import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

from latentlab.lm.modeling import (
    TinyLMConfig,
    build_tiny_lm,
    content_hash,
    load_lm,
    prepare_pretrained,
    read_manifest,
    save_lm,
)
from latentlab.lm.tokenizer import INJECT, build_char_tokenizer


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_saved_models_load_with_plain_transformers(tmp_path, arch):
    tokenizer = build_char_tokenizer()
    model = build_tiny_lm(TinyLMConfig(arch=arch, hidden_size=32, layers=2, heads=4, intermediate_size=64), tokenizer)
    digest = save_lm(model, tokenizer, tmp_path, source="scratch")
    assert {p.name for p in tmp_path.iterdir()} >= {
        "model.safetensors",
        "config.json",
        "tokenizer.json",
        "latentlab.json",
    }
    assert not list(tmp_path.glob("*.bin")) and not list(tmp_path.glob("*.pt"))  # never pickle
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    loaded_tokenizer = AutoTokenizer.from_pretrained(tmp_path)
    assert loaded.config.model_type == arch
    ids = torch.tensor([loaded_tokenizer("12+7=")["input_ids"]])
    assert torch.equal(model.eval()(ids).logits, loaded.eval()(ids).logits)
    assert read_manifest(tmp_path)["content_sha256"] == digest == content_hash(tmp_path)


def test_a_directory_without_config_is_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_lm(tmp_path)


def test_hub_models_get_a_pad_token_and_the_inject_slot(tmp_path):
    """A foreign tokenizer without pad or <INJECT> (as many hub models): both are added, embeddings grow."""
    backend = Tokenizer(models.WordLevel({"<unk>": 0, "</s>": 1, "a": 2, "b": 3}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="</s>", unk_token="<unk>")
    assert tokenizer.pad_token is None
    model = build_tiny_lm(TinyLMConfig(hidden_size=32, layers=1, heads=4, intermediate_size=64), build_char_tokenizer())
    model.resize_token_embeddings(len(tokenizer))
    prepare_pretrained(model, tokenizer)
    assert tokenizer.pad_token == "</s>" and INJECT in tokenizer.get_vocab()
    assert model.get_input_embeddings().weight.shape[0] == len(tokenizer) == 5


def test_a_model_path_that_does_not_exist_is_named_not_a_traceback(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match="no such model directory"):
        load_lm(tmp_path / "nowhere")
    # "models/base" reads like a hub id too: with no such directory and no hub to serve it, one clear line
    with pytest.raises(FileNotFoundError, match="models/base: no such directory, and not a Hugging Face hub id"):
        load_lm("models/base")
