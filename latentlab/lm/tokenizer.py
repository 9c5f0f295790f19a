"""The character-level tokenizer of the scratch model, saved as a Hugging Face fast tokenizer;
`token_ids`, the batch encoder the labelling path reads ids with (any tokenizer); and what a real
checkpoint's tokenizer needs from us: a pad token, a special token added beside its own, and which id
really means "unknown".

One token per character, so arithmetic is spelled digit by digit; special tokens `<pad>`,
`<eos>`, `<unk>` and `<INJECT>` (the slot where NLA places an activation vector).
"""

import re
import string
from collections.abc import Collection, Sequence

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

PAD, EOS, UNK, INJECT = "<pad>", "<eos>", "<unk>", "<INJECT>"
SPECIAL_TOKENS = [PAD, EOS, UNK, INJECT]
CHARACTERS = string.digits + "+-*/=<>()" + string.ascii_lowercase + string.ascii_uppercase + " .,:;!?'\"_#\n"


def build_char_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS + list(CHARACTERS))}
    backend = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")  # every character
    backend.decoder = decoders.Fuse()  # join characters back without spaces
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token=PAD,
        eos_token=EOS,
        unk_token=UNK,
        additional_special_tokens=[INJECT],
        padding_side="left",  # prompts are left-padded so every prompt ends at the same position
        model_max_length=10_000,
    )


def token_ids(tokenizer, texts: Sequence[str]) -> list[list[int]]:
    """`tokenizer(texts, add_special_tokens=False)["input_ids"]`, read straight from a fast tokenizer's Rust
    batch encoder when special tokens split as the wrapper would split them. The same ids, without the wrapper's
    per-row masks and offsets: 10 vs 17-21 ms per 2,048 prompts of the default DAG. Any other tokenizer goes
    through the wrapper."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or backend.encode_special_tokens != getattr(tokenizer, "split_special_tokens", False):
        return tokenizer(list(texts), add_special_tokens=False)["input_ids"]
    # A call like this one turns off whatever padding or truncation the backend holds (a padded call leaves its
    # padding set; a tokenizer.json may bring its own) and leaves them off (set_truncation_and_padding): so do we
    if backend.padding is not None:
        backend.no_padding()
    if backend.truncation is not None:
        backend.no_truncation()
    encode = getattr(backend, "encode_batch_fast", backend.encode_batch)  # _fast: no offsets (tokenizers >= 0.20)
    return [encoding.ids for encoding in encode(list(texts), add_special_tokens=False)]


# Special tokens a checkpoint holds but never has to emit, to pad with: named as padding
# (Llama 3.1's <|finetune_right_pad_id|>, <pad>, [PAD]) first, then reserved ones (Llama 3's
# <|reserved_special_token_N|>). Multimodal placeholders (<|vision_pad|>, <|image_pad|>) are not spare.
_PAD_NAMES = re.compile(r"<\|?(pad|padding|finetune_right_pad_id)\|?>|\[PAD\]", re.IGNORECASE)
_RESERVED_NAMES = re.compile(r"reserved", re.IGNORECASE)


def spare_pad_token(tokenizer, rows: int, avoid: Collection[int] = ()) -> str | None:
    """A special token of the tokenizer that nothing else uses, to pad with: not one of its named or additional
    special tokens, not in `avoid` (the ids the model must emit: its stop ids), with an embedding row (id <
    `rows`). None when there is none (GPT-2: then padding is eos, which masks make harmless)."""
    taken = set(tokenizer.all_special_ids) | set(avoid)
    spare = [
        token.content
        for index, token in sorted(tokenizer.added_tokens_decoder.items())
        if token.special and index < rows and index not in taken and token.content != INJECT
    ]
    named = [content for content in spare if _PAD_NAMES.fullmatch(content)]
    reserved = [content for content in spare if _RESERVED_NAMES.search(content)]
    return (named + reserved + [None])[0]


def ensure_pad_token(tokenizer, rows: int, avoid: Collection[int] = ()) -> None:
    """Give a tokenizer without one a pad token: a spare special token (`spare_pad_token`), else eos (then
    bos, unk). Padding is always handled by attention masks (`lm.padding`), never by the pad id's value, so a
    pad equal to eos is harmless: eos tokens a row really holds keep their mask of 1."""
    if tokenizer.pad_token is not None:
        return
    token = spare_pad_token(tokenizer, rows, avoid)
    token = token or tokenizer.eos_token or tokenizer.bos_token or tokenizer.unk_token
    if token is not None:
        tokenizer.pad_token = token


def add_special_token(tokenizer, token: str) -> bool:
    """Add `token` as an additional special token beside the tokenizer's own (Qwen's 13 <|im_start|>...
    stay special: a plain `add_special_tokens({"additional_special_tokens": [token]})` replaces them).
    Returns whether it was new."""
    if token in tokenizer.get_vocab():
        return False
    tokenizer.add_special_tokens({"additional_special_tokens": [token]}, replace_extra_special_tokens=False)
    return True


def unknown_token_id(tokenizer) -> int | None:
    """The id that means "not in the vocabulary", or None when there is none: a tokenizer whose unk token is
    also its eos or bos (GPT-2's <|endoftext|> is both) reads that id for the real token, which a prompt may
    hold; its byte-level vocabulary has nothing unknown."""
    unk = tokenizer.unk_token_id
    if unk is None or unk in {tokenizer.eos_token_id, tokenizer.bos_token_id}:
        return None
    return unk
