"""The one tiny model of the unit tests: a seeded random Llama (H=32, 2 blocks) with the character tokenizer."""

import torch

from latentlab.lm.modeling import TinyLMConfig, build_tiny_lm
from latentlab.lm.tokenizer import build_char_tokenizer


def new_tiny_lm(embedding_scale: float = 1.0, **sizes):
    """A fresh (model, tokenizer), identical for the same arguments; `sizes` override TinyLMConfig fields.

    `embedding_scale` sharpens the tied output layer: at the default init the logits are too flat for
    an injected input to steer them far.
    """
    torch.manual_seed(0)
    tokenizer = build_char_tokenizer()
    cfg = TinyLMConfig(
        **{"hidden_size": 32, "layers": 2, "heads": 4, "intermediate_size": 64, "max_positions": 64, **sizes}
    )
    model = build_tiny_lm(cfg, tokenizer).eval()
    if embedding_scale != 1.0:
        with torch.no_grad():
            model.get_input_embeddings().weight.mul_(embedding_scale)
    return model, tokenizer
