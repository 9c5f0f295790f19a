from transformers import AutoTokenizer

from latentlab.lm.tokenizer import CHARACTERS, EOS, INJECT, PAD, build_char_tokenizer


def test_round_trip_of_every_character():
    tokenizer = build_char_tokenizer()
    ids = tokenizer(CHARACTERS, add_special_tokens=False)["input_ids"]
    assert len(ids) == len(CHARACTERS)  # one token per character
    assert tokenizer.decode(ids) == CHARACTERS


def test_special_tokens_are_single_ids_and_survive_save(tmp_path):
    tokenizer = build_char_tokenizer()
    tokenizer.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    text = f"12+7={INJECT}19"
    ids = loaded(text, add_special_tokens=False)["input_ids"]
    assert ids.count(loaded.convert_tokens_to_ids(INJECT)) == 1
    assert len(ids) == len("12+7=") + 1 + 2
    assert loaded.decode(ids) == text
    assert loaded.pad_token == PAD and loaded.eos_token == EOS
    assert loaded.decode(ids + [loaded.eos_token_id], skip_special_tokens=True) == "12+7=19"
