import pytest
from tokenizers import AddedToken, Tokenizer, models
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from latentlab.lm.tokenizer import CHARACTERS, EOS, INJECT, PAD, build_char_tokenizer, token_ids


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


TEXTS = ["12+7=19", f"a{INJECT}b{EOS}", "é€ unknown to the char vocabulary", "", "the quick brown fox " * 20]


def bpe_tokenizer():
    """A byte-level BPE tokenizer trained here (as hub models ship), with special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=[EOS, INJECT], show_progress=False)
    backend.train_from_iterator(TEXTS * 10, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token=EOS, pad_token=EOS, additional_special_tokens=[INJECT]
    )


@pytest.mark.parametrize("make", [build_char_tokenizer, bpe_tokenizer])
def test_token_ids_are_the_wrappers_ids(make):
    """`token_ids` reads the Rust encoder directly: the same ids as `tokenizer(...)`, special tokens kept whole
    (or split, as the tokenizer says)."""
    tokenizer = make()
    expected = tokenizer(TEXTS, add_special_tokens=False)["input_ids"]
    assert token_ids(tokenizer, TEXTS) == expected
    split = make()
    split.split_special_tokens = True
    first, again = token_ids(split, TEXTS), token_ids(split, TEXTS)  # through the wrapper, then straight
    assert first == again == split(TEXTS, add_special_tokens=False)["input_ids"] != expected


@pytest.mark.parametrize("make", [build_char_tokenizer, bpe_tokenizer])
@pytest.mark.parametrize(
    "leave",
    [
        # a padded, truncated call leaves both on the backend
        lambda tokenizer: tokenizer(TEXTS, padding=True, truncation=True, max_length=5),
        lambda tokenizer: tokenizer.backend_tokenizer.enable_padding(length=40),
        lambda tokenizer: tokenizer.backend_tokenizer.enable_truncation(3),
    ],
    ids=["after a padded call", "padding set", "truncation set"],
)
def test_token_ids_turn_off_what_the_wrapper_turns_off(make, leave):
    """Padding or truncation left on the backend: the wrapper's call turns them off and leaves them off, and so does
    `token_ids` (read straight from the backend, left as it was, the ids would be padded or cut)."""
    tokenizer, twin = make(), make()
    for each in (tokenizer, twin):
        leave(each)
    assert tokenizer.backend_tokenizer.padding is not None or tokenizer.backend_tokenizer.truncation is not None
    expected = twin(TEXTS, add_special_tokens=False)["input_ids"]
    assert token_ids(tokenizer, TEXTS) == expected
    backend, twin_backend = tokenizer.backend_tokenizer, twin.backend_tokenizer
    assert (backend.padding, backend.truncation) == (twin_backend.padding, twin_backend.truncation) == (None, None)


def test_a_tokenizer_without_pad_gets_a_spare_special_token_never_a_stop_token():
    from latentlab.lm.tokenizer import ensure_pad_token, spare_pad_token

    backend = Tokenizer(models.WordLevel({"<unk>": 0, "<s>": 1, "</s>": 2, "<|eot|>": 3, "a": 4}, unk_token="<unk>"))
    reserved = [AddedToken(f"<|reserved_special_token_{i}|>", special=True) for i in range(2)]
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    tokenizer.add_tokens([AddedToken("<|eot|>", special=True), *reserved], special_tokens=True)
    assert tokenizer.pad_token is None
    eot, first, second = tokenizer.convert_tokens_to_ids(["<|eot|>", reserved[0].content, reserved[1].content])
    assert spare_pad_token(tokenizer, rows=first) is None  # no embedding row for the reserved ones
    assert spare_pad_token(tokenizer, rows=10, avoid=[first]) == reserved[1].content
    ensure_pad_token(tokenizer, rows=10, avoid=[2, eot])
    assert tokenizer.pad_token_id == first
    bare = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="</s>")
    ensure_pad_token(bare, rows=10)  # nothing spare: eos, which masks make harmless
    assert bare.pad_token == "</s>"


def test_a_special_token_is_added_beside_the_tokenizers_own():
    from latentlab.lm.tokenizer import add_special_token

    tokenizer = bpe_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>"]}, replace_extra_special_tokens=False)
    own = set(tokenizer.all_special_ids)
    assert add_special_token(tokenizer, "<NEW>") and not add_special_token(tokenizer, "<NEW>")
    assert set(tokenizer.all_special_ids) == own | {tokenizer.convert_tokens_to_ids("<NEW>")}


def test_unk_is_unknown_only_when_it_is_not_also_eos_or_bos():
    from latentlab.lm.tokenizer import unknown_token_id

    char = build_char_tokenizer()
    assert unknown_token_id(char) == char.unk_token_id
    backend = Tokenizer(models.WordLevel({"<|endoftext|>": 0, "a": 1}, unk_token="<|endoftext|>"))
    gpt2_like = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<|endoftext|>", eos_token="<|endoftext|>", unk_token="<|endoftext|>"
    )
    assert gpt2_like.unk_token_id == 0 and unknown_token_id(gpt2_like) is None
