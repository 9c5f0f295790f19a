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


# Integrity: load_lm checks a saved directory against the content hash its manifest records.


def _saved(directory, tiny_lm):
    save_lm(*tiny_lm, directory, source="scratch")
    return directory


def _flip(file, offset=-100):
    data = bytearray(file.read_bytes())
    data[offset] ^= 0xFF
    file.write_bytes(bytes(data))


def test_content_hash_is_still_name_then_bytes_of_every_weight_and_config_file(tmp_path, tiny_lm):
    """Streaming the files must not change the hash every existing manifest (and dvc.lock) records."""
    import hashlib

    _saved(tmp_path, tiny_lm)
    digest = hashlib.sha256()
    for file in sorted(tmp_path.iterdir()):
        if file.suffix in {".safetensors", ".json"} and file.name != "latentlab.json":
            digest.update(file.name.encode() + file.read_bytes())
    assert content_hash(tmp_path) == digest.hexdigest() == read_manifest(tmp_path)["content_sha256"]


def test_a_corrupted_weight_file_is_refused_naming_the_directory_and_how_to_restore_it(tmp_path, tiny_lm):
    from latentlab.common.errors import InputError

    _flip(_saved(tmp_path, tiny_lm) / "model.safetensors")  # a bit flip in the weights: still a valid file
    with pytest.raises(InputError) as error:
        load_lm(tmp_path)
    message = str(error.value)
    assert message.startswith(f"{tmp_path} does not match the content hash its latentlab.json records")
    assert "rerun the stage that wrote it" in message and "dvc checkout --relink" in message and "dvc pull" in message
    assert "\n" not in message
    load_lm(tmp_path, verify=False)  # the check can be skipped: the file itself still loads


def test_a_truncated_weight_file_is_named(tmp_path, tiny_lm):
    from latentlab.common.errors import InputError

    weights = _saved(tmp_path, tiny_lm) / "model.safetensors"
    size = weights.stat().st_size
    weights.write_bytes(weights.read_bytes()[: size // 2])
    with pytest.raises(InputError, match=rf"model.safetensors is truncated: {size // 2} of {size} bytes"):
        load_lm(tmp_path)


def test_skipping_the_check_still_names_a_damaged_weight_file(tmp_path, tiny_lm, monkeypatch):
    """LATENTLAB_SKIP_VERIFY=1 (huge models): no hash, but a file safetensors cannot read is named, not a traceback."""
    from latentlab.common.errors import InputError

    weights = _saved(tmp_path, tiny_lm) / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    monkeypatch.setenv("LATENTLAB_SKIP_VERIFY", "1")
    with pytest.raises(InputError) as error:
        load_lm(tmp_path)
    assert str(error.value).startswith(f"{weights}: the file is damaged (")
    assert "rerun the stage that wrote it, or restore it with `dvc checkout`" in str(error.value)


def test_an_edited_config_is_refused_too(tmp_path, tiny_lm):
    """The hash covers every .json and .safetensors file of the directory, the config and tokenizer included."""
    from latentlab.common.errors import InputError

    config = _saved(tmp_path, tiny_lm) / "config.json"
    config.write_text(config.read_text().replace('"rms_norm_eps": 1e-06', '"rms_norm_eps": 1e-05'))
    with pytest.raises(InputError, match="does not match the content hash"):
        load_lm(tmp_path)


def test_a_directory_without_a_manifest_loads_unchecked(tmp_path, tiny_lm):
    """A plain Hugging Face directory (a hub snapshot) has no manifest: nothing to check against."""
    (_saved(tmp_path, tiny_lm) / "latentlab.json").unlink()
    model, _ = load_lm(tmp_path)
    assert model.config.num_hidden_layers == 2


def test_an_add_on_beside_the_model_is_covered_by_the_same_hash(tmp_path, tiny_lm):
    """An NLA actor directory: the model plus its injector files under one manifest (save_actor); load_lm checks all."""
    from latentlab.common.errors import InputError
    from latentlab.lm.modeling import save_weights, write_manifest

    _saved(tmp_path, tiny_lm)
    save_weights(torch.nn.Linear(4, 4), tmp_path / "injector.safetensors")
    write_manifest(tmp_path, source="scratch")
    load_lm(tmp_path)
    _flip(tmp_path / "injector.safetensors", -1)
    with pytest.raises(InputError, match="does not match the content hash"):
        load_lm(tmp_path)


def test_a_saved_injector_is_checked_before_it_is_loaded(tmp_path):
    from latentlab.common.errors import InputError
    from latentlab.policies.injection import HiddenStateInjector, InjectorConfig, save_injector
    from latentlab.policies.loading import load_policy
    from tests.tiny import new_tiny_lm

    save_lm(*new_tiny_lm(), tmp_path / "sft")
    save_injector(HiddenStateInjector(32, InjectorConfig()), tmp_path / "inject", base=tmp_path / "sft")
    load_policy(tmp_path / "inject")
    _flip(tmp_path / "inject" / "injector.safetensors", -1)
    with pytest.raises(InputError, match=f"{tmp_path / 'inject'} does not match the content hash"):
        load_policy(tmp_path / "inject")


def test_the_scratch_model_loads_and_prepares_unchanged(tmp_path, tiny_lm):
    """The default model already has its pad token and <INJECT>: loading (and preparing, as `model.source: <its
    directory>` would) changes no byte of its weights, config or vocabulary, and its one stop id is its eos."""
    from latentlab.lm.modeling import stop_token_ids
    from latentlab.lm.tokenizer import PAD

    save_lm(*tiny_lm, tmp_path / "saved", source="scratch")
    model, tokenizer = load_lm(tmp_path / "saved")
    assert tokenizer.pad_token == PAD and model.config.pad_token_id == tokenizer.pad_token_id
    assert stop_token_ids(model, tokenizer) == [tokenizer.eos_token_id]
    loaded = save_lm(model, tokenizer, tmp_path / "loaded", source="scratch")
    vocabulary = dict(tokenizer.get_vocab())
    prepare_pretrained(model, tokenizer)
    assert tokenizer.get_vocab() == vocabulary and model.get_input_embeddings().num_embeddings == len(vocabulary)
    # a load-and-save round trip adds transformers' own keys to tokenizer_config.json, with or without preparing
    assert save_lm(model, tokenizer, tmp_path / "prepared", source="scratch") == loaded
    for file in ("model.safetensors", "config.json", "generation_config.json", "tokenizer.json"):
        assert (tmp_path / "prepared" / file).read_bytes() == (tmp_path / "saved" / file).read_bytes(), file


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_a_saved_scratch_model_reloads_with_its_own_tokenizer(tmp_path, arch):
    """AutoTokenizer on a directory whose config.json says qwen2 returns Qwen2Tokenizer, which drops the character
    tokenizer's newlines: load_lm loads the tokenizer class the directory names, so the ids round-trip."""
    from latentlab.lm.modeling import TinyLMConfig, build_tiny_lm, load_lm, save_lm

    tokenizer = build_char_tokenizer()
    model = build_tiny_lm(TinyLMConfig(arch=arch, hidden_size=16, layers=1, heads=2, intermediate_size=32), tokenizer)
    save_lm(model, tokenizer, tmp_path / "m")
    _, reloaded = load_lm(tmp_path / "m")
    text = "1+1=2\n3"
    assert reloaded(text)["input_ids"] == tokenizer(text)["input_ids"]
