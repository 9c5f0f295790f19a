"""SFT with a placeholder position: a consumer that has seen the virtual token before `inject` uses it.

A share of the SFT examples gets one extra position between prompt and answer, `<INJECT>`, whose input
embedding is replaced by what the injector of `variant` writes there at step 0, computed from the
model being trained (detached):

    residual  h                                  (layer `layer` at the prompt's last position)
    norm      m h / ||h||                        m = the mean L2 norm of the embedding rows (inject.scale null)
    token     the mean embedding row             (inject.init_token null)

(gated appends nothing, so it has no placeholder.) The `<INJECT>` position is not a target: the loss
stays on the answer and <eos>, the first answer token now predicted from the placeholder. The same
values as `build_injector(model, InjectorConfig(variant=...))(h)` (tested), kept apart so that the
sft stage does not depend on the injection code.
"""

from typing import Literal

import torch
from torch import nn

from latentlab.lm.capture import LayerCapture

PlaceholderVariant = Literal["residual", "norm", "token"]


def placeholder_vector(variant: PlaceholderVariant, h: torch.Tensor, embeddings: torch.Tensor) -> torch.Tensor:
    """`(N, H)` step-0 vectors of `variant` for hidden states `h` `(N, H)` and embedding rows `(V, H)`."""
    rows = embeddings.detach().float()
    if variant == "residual":
        return h
    if variant == "norm":
        return rows.norm(dim=-1).mean() * h / h.norm(dim=-1, keepdim=True).clamp(min=1e-8)
    return rows.mean(0).expand_as(h)


def add_placeholders(examples, share: float, inject_id: int, generator: torch.Generator):
    """(sequences, targets) with `<INJECT>` inserted after the prompt of round(share * N) examples,
    chosen by `generator`; the prompt ends before the first target token."""
    sequences, targets = examples
    chosen = set(torch.randperm(len(sequences), generator=generator)[: round(share * len(sequences))].tolist())
    out_sequences, out_targets = [], []
    for i, (sequence, target) in enumerate(zip(sequences, targets)):
        if i in chosen:
            end = target.index(1)
            sequence, target = [*sequence[:end], inject_id, *sequence[end:]], [*target[:end], 0, *target[end:]]
        out_sequences.append(sequence)
        out_targets.append(target)
    return out_sequences, out_targets


class PlaceholderLM(nn.Module):
    """`model` whose `<INJECT>` inputs hold the placeholder vector; rows without one pass unchanged.

    Two passes when a batch holds `<INJECT>`: one without gradient reads h at the position before it
    (causal attention: that state does not depend on what follows), the trained one sees the vector.
    """

    def __init__(self, model, inject_id: int, variant: PlaceholderVariant, layer: int):
        super().__init__()
        self.model, self.inject_id, self.variant, self.layer = model, inject_id, variant, layer

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor):
        rows, columns = (input_ids == self.inject_id).nonzero(as_tuple=True)
        if len(rows) == 0:
            return self.model(input_ids=input_ids, attention_mask=attention_mask)
        with torch.no_grad(), LayerCapture(self.model, [self.layer]) as capture:
            self.model(input_ids=input_ids, attention_mask=attention_mask)
            h = capture.stacked()[rows, columns - 1, 0].float()  # (N, H) the prompt's last position
        embedding = self.model.get_input_embeddings()
        vectors = placeholder_vector(self.variant, h, embedding.weight)
        embeds = embedding(input_ids).index_put((rows, columns), vectors.to(embedding.weight.dtype))
        return self.model(inputs_embeds=embeds, attention_mask=attention_mask)
