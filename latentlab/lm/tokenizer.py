"""The character-level tokenizer of the scratch model, saved as a Hugging Face fast tokenizer.

One token per character, so arithmetic is spelled digit by digit; special tokens `<pad>`,
`<eos>`, `<unk>` and `<INJECT>` (the slot where NLA places an activation vector).
"""

import string

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
