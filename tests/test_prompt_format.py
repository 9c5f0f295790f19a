"""Prompt formats (issue 27, point 2, and BOS of point 1): raw prompts after the BOS the checkpoint's tokenizer adds,
the chat template with a system prompt, answers ending the turn as the template ends it, the end of a chat turn a
stop id; through the sampler, SFT, the extractor, `latentlab label` / `serve` and the stages' params."""

import json

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer

from latentlab.cli import main as cli
from latentlab.hidden.extract import ExtractConfig, Extractor
from latentlab.hidden.store import open_store
from latentlab.lm.modeling import load_lm
from latentlab.lm.prompt_format import RAW, PromptFormat, leading_special_ids
from latentlab.lm.sampling import tokenize_prompts
from latentlab.lm.tokenizer import build_char_tokenizer, token_ids
from latentlab.lm.training import prompt_answer_examples
from latentlab.policies.lm_policy import LMPolicy
from tests.families import build_family, copy_tokenizer, require_family

CHAT = PromptFormat(format="chat")
BOS = 128000  # Llama 3's <|begin_of_text|>


def llama3_hub_tokenizer(directory):
    """Llama 3's tokenizer as the hub ships it: its tokenizer.json adds <|begin_of_text|> in front of every text
    (a TemplateProcessing after the byte-level one; the npm copy in ../shared lacks it)."""
    copy_tokenizer(require_family("llama3").tokenizer, directory)
    path = directory / "tokenizer.json"
    data = json.loads(path.read_text())
    data["post_processor"] = {
        "type": "Sequence",
        "processors": [
            data["post_processor"],
            {
                "type": "TemplateProcessing",
                "single": [{"SpecialToken": {"id": "<|begin_of_text|>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
                "pair": [{"SpecialToken": {"id": "<|begin_of_text|>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                         {"SpecialToken": {"id": "<|begin_of_text|>", "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
                "special_tokens": {"<|begin_of_text|>": {"id": "<|begin_of_text|>", "ids": [BOS], "tokens": ["<|begin_of_text|>"]}},
            },
        ],
    }  # fmt: skip
    path.write_text(json.dumps(data))
    tokenizer = AutoTokenizer.from_pretrained(directory)
    tokenizer.pad_token = "<|reserved_special_token_0|>"  # as load_lm gives it one
    return tokenizer


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    found = {"char": build_char_tokenizer()}
    for name in ("qwen3", "gpt2"):
        directory = tmp_path_factory.mktemp(name)
        copy_tokenizer(require_family(name).tokenizer, directory)
        found[name] = AutoTokenizer.from_pretrained(directory)
    try:
        found["llama3"] = llama3_hub_tokenizer(tmp_path_factory.mktemp("llama3"))
    except pytest.skip.Exception:
        pass
    return found


def test_raw_prompts_of_the_scratch_model_are_its_ids_unchanged(tokenizers):
    """The default DAG's ids: nothing in front, nothing after (its outputs stay byte for byte)."""
    char = tokenizers["char"]
    prompts = ["12+7=", "3-40="]
    assert leading_special_ids(char) == []
    assert RAW.encode(char, prompts) == token_ids(char, prompts) == char(prompts, add_special_tokens=False)["input_ids"]


def test_raw_prompts_start_with_bos_where_the_checkpoints_tokenizer_adds_it(tokenizers):
    llama = tokenizers.get("llama3") or pytest.skip("no Llama 3 tokenizer here")
    ids, mask = tokenize_prompts(llama, ["12+7=", "Hello world, how are you"], "cpu")
    starts = mask.long().argmax(1)  # left-padded: each row's first real position
    assert [ids[row, start].item() for row, start in enumerate(starts)] == [BOS, BOS]
    assert ids[1, starts[1] :].tolist() == llama("Hello world, how are you")["input_ids"]
    for name in ("qwen3", "gpt2"):  # no BOS added by these tokenizers: none put in front
        assert RAW.encode(tokenizers[name], ["12+7="]) == [
            tokenizers[name]("12+7=", add_special_tokens=False)["input_ids"]
        ]


@pytest.mark.parametrize("name", ["qwen3", "llama3"])
def test_chat_prompts_are_the_templates_generation_prompt_with_a_system_turn(tokenizers, name):
    tokenizer = tokenizers.get(name) or pytest.skip(f"no {name} tokenizer here")
    fmt = PromptFormat(format="chat", system="Answer with a number.")
    turns = [{"role": "system", "content": "Answer with a number."}, {"role": "user", "content": "12+7="}]
    expected = tokenizer.apply_chat_template(turns, add_generation_prompt=True, tokenize=True)
    expected = expected["input_ids"] if isinstance(expected, dict) or hasattr(expected, "keys") else expected
    assert fmt.encode(tokenizer, ["12+7="]) == [list(expected)]
    assert CHAT.encode(tokenizer, ["12+7="]) != fmt.encode(tokenizer, ["12+7="])  # the system turn is there
    if name == "llama3":  # the template writes BOS itself: once, not twice
        assert CHAT.encode(tokenizer, ["1"])[0][:2] == [BOS, tokenizer.convert_tokens_to_ids("<|start_header_id|>")]


def test_chat_answers_end_the_turn_as_the_template_ends_it(tokenizers):
    qwen = tokenizers["qwen3"]
    sequences, targets = prompt_answer_examples(qwen, ["12+7="], ["19"], CHAT)
    (sequence,), (target,) = sequences, targets
    prompt = CHAT.encode(qwen, ["12+7="])[0]
    answer = sequence[len(prompt) :]
    assert sequence[: len(prompt)] == prompt and target == [0] * len(prompt) + [1] * len(answer)
    # Qwen3's template writes an empty reasoning block before a final answer, and ends the turn with <|im_end|>
    assert qwen.decode(answer) == "<think>\n\n</think>\n\n19<|im_end|>"
    assert CHAT.end_id(qwen) == qwen.convert_tokens_to_ids("<|im_end|>")
    if llama := tokenizers.get("llama3"):
        (sequence,), _ = prompt_answer_examples(llama, ["12+7="], ["19"], CHAT)
        assert llama.decode(sequence[-2:]) == "19<|eot_id|>" and CHAT.end_id(llama) == 128009
    # raw: the answer and end-of-sequence, as before
    (sequence,), (target,) = prompt_answer_examples(qwen, ["12+7="], ["19"], RAW)
    prompt, answer = qwen("12+7=")["input_ids"], qwen("19")["input_ids"]
    assert sequence == prompt + answer + [qwen.eos_token_id] and target == [0] * len(prompt) + [1] * (len(answer) + 1)


def test_chat_is_refused_for_a_tokenizer_without_a_template_naming_it(tokenizers):
    with pytest.raises(ValueError, match="no chat template"):
        CHAT.encode(tokenizers["gpt2"], ["12+7="])


def test_a_chat_turns_end_stops_a_base_checkpoint_whose_generation_config_lacks_it(tmp_path):
    """Llama 3 base lists only <|end_of_text|> (128001): a chat-format policy still stops at <|eot_id|>."""
    directory = build_family("llama3", tmp_path / "llama3")
    config = json.loads((directory / "generation_config.json").read_text())
    (directory / "generation_config.json").write_text(json.dumps(config | {"eos_token_id": 128001}))
    model, tokenizer = load_lm(directory)
    assert 128009 not in LMPolicy(model, tokenizer).stop_ids
    assert LMPolicy(model, tokenizer, CHAT).stop_ids[-1] == 128009
    assert Extractor(model, tokenizer, ExtractConfig(tokens=4), CHAT).stop_ids[-1] == 128009


@pytest.fixture(scope="module")
def qwen3_dir(tmp_path_factory):
    return build_family("qwen3", tmp_path_factory.mktemp("qwen3"))


def label(model_dir, prompts, out, *options):
    cli(["label", "--model", str(model_dir), "--prompts", str(prompts), "--out", str(out), "--layers", "-1", *options])


def test_latentlab_label_in_chat_format_pools_the_templated_prompt_and_records_it(qwen3_dir, tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("12+7=\n3-40=\n")
    label(qwen3_dir, prompts, tmp_path / "raw.zarr")
    label(qwen3_dir, prompts, tmp_path / "chat.zarr", "--prompt-format", "chat", "--system-prompt", "Be brief.")
    raw, chat = open_store(tmp_path / "raw.zarr"), open_store(tmp_path / "chat.zarr")
    assert "prompt" not in raw.attrs  # raw stores keep the attributes they always had
    assert chat.attrs["prompt"] == {"format": "chat", "system": "Be brief."}
    fmt = PromptFormat(format="chat", system="Be brief.")
    model, tokenizer = load_lm(qwen3_dir)
    expected = Extractor(model, tokenizer, ExtractConfig(layers=[-1]), fmt)(["12+7=", "3-40="]).pooled
    assert np.allclose(chat["pooled"][:].astype(np.float32), expected.numpy(), atol=1e-5)
    assert chat["n_positions"][:].tolist() == [len(row) for row in fmt.encode(tokenizer, ["12+7=", "3-40="])]
    assert not np.allclose(raw["pooled"][:].astype(np.float32), chat["pooled"][:].astype(np.float32), atol=1e-3)


def test_a_system_prompt_without_chat_is_refused_before_any_work(qwen3_dir, tmp_path, capsys):
    prompts = tmp_path / "p.txt"
    prompts.write_text("12+7=\n")
    with pytest.raises(SystemExit):
        label(qwen3_dir, prompts, tmp_path / "x.zarr", "--system-prompt", "Be brief.")
    assert "--system-prompt needs --prompt-format chat" in capsys.readouterr().err
    assert not (tmp_path / "x.zarr").exists()


def test_serve_in_chat_format_says_so_and_embeds_the_templated_prompt(qwen3_dir):
    from tests.test_serve import call, start_server

    process, url = start_server(qwen3_dir, "--layers", "-1", "--prompt-format", "chat")
    try:
        status, health = call(url, "/health")
        assert status == 200 and health["prompt"] == {"format": "chat", "system": None}
        status, answer = call(url, "/embed", {"prompts": ["12+7="]})
        assert status == 200, answer
        model, tokenizer = load_lm(qwen3_dir)
        expected = Extractor(model, tokenizer, ExtractConfig(layers=[-1]), CHAT)(["12+7="]).pooled
        assert np.allclose(np.asarray(answer["pooled"], dtype=np.float32), expected.numpy(), atol=1e-4)
    finally:
        process.terminate()
        process.wait(timeout=10)


def test_the_sampler_feeds_exactly_the_formatted_ids(qwen3_dir):
    model, tokenizer = load_lm(qwen3_dir)
    policy = LMPolicy(model, tokenizer, CHAT)
    rollout = policy.encode(["12+7="])
    assert rollout.prompt_ids[0].tolist() == CHAT.encode(tokenizer, ["12+7="])[0]
    assert torch.equal(rollout.prompt_mask, torch.ones_like(rollout.prompt_mask))
