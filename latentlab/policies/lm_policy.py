"""A language model seen as a policy over completions, as the GRPO core and the evaluator use it.

`LMPolicy` turns prompts into a prefix of input embeddings (here: the prompt tokens' embeddings),
samples completions from it with the shared sampler and scores sampled completions with
gradients. Variants change only `prefix` (e.g. the injection policy appends a virtual token),
`trainable_parameters` and `regularizers`; sampling and log-probs stay the same code.

Groups: `rollout(prompts, ..., group_size=G)` samples G completions of each of the P prompts. The
policy encodes, prepares and runs the prefix of the P prompts once and the sampler expands their KV
cache to the P * G rows; the returned rollout holds P * G rows (row p * G + g: completion g of prompt
p, its per-row tensors repeated) and remembers G, so that `logprobs` shares the prefix pass too.
"""

from dataclasses import dataclass, field

import torch

from latentlab.lm.modeling import stop_token_ids
from latentlab.lm.prompt_format import RAW, PromptFormat
from latentlab.lm.sampling import Completions, SamplingConfig, completion_logprobs, sample, tokenize_prompts


@dataclass
class Rollout:
    prompt_ids: torch.Tensor  # (B, P) left-padded
    prompt_mask: torch.Tensor  # (B, P)
    completions: Completions
    texts: list[str]  # decoded completions, up to end-of-sequence
    extras: dict[str, torch.Tensor] = field(default_factory=dict)  # what a policy variant caches per row
    group_size: int = 1  # G: rows p * G .. p * G + G - 1 share prompt p (and its prefix)

    def select(self, rows: torch.Tensor) -> "Rollout":
        """The rollout of some rows only (a minibatch), every per-row tensor indexed alike (no groups)."""
        c = self.completions
        return Rollout(
            self.prompt_ids[rows],
            self.prompt_mask[rows],
            Completions(
                c.ids[rows],
                c.mask[rows],
                c.logprobs[rows],
                None if c.behaviour_logprobs is None else c.behaviour_logprobs[rows],
            ),
            [self.texts[i] for i in rows.tolist()],
            {name: value[rows] for name, value in self.extras.items()},
        )

    def heads(self) -> "Rollout":
        """The first row of every group: the P distinct prompts (their ids, mask and extras), nothing sampled."""
        G = self.group_size
        extras = {name: value[::G] for name, value in self.extras.items()}
        return Rollout(self.prompt_ids[::G], self.prompt_mask[::G], None, [], extras)

    def repeat(self, group_size: int) -> None:
        """Repeat every per-row tensor `group_size` times along the rows, in place (prompt p -> rows p * G + g)."""
        self.prompt_ids = self.prompt_ids.repeat_interleave(group_size, dim=0)
        self.prompt_mask = self.prompt_mask.repeat_interleave(group_size, dim=0)
        self.extras = {name: value.repeat_interleave(group_size, dim=0) for name, value in self.extras.items()}
        self.group_size = group_size


class LMPolicy:
    TRAINS: tuple[str, ...] = ("model",)
    """The attributes holding the modules that train: what the execution layer wraps (DDP, FSDP2)."""

    def __init__(self, model, tokenizer, prompt_format: PromptFormat = RAW):
        self.model = model
        self.tokenizer = tokenizer
        self.prompt_format = prompt_format  # how prompt texts become ids (raw, or the chat template)
        self.stop_ids = stop_token_ids(model, tokenizer, prompt_format.end_id(tokenizer))

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def encode(self, prompts: list) -> Rollout:
        """A rollout with the prompts' left-padded token ids and nothing sampled yet (variants may read
        other things than text as their prompts, e.g. activation vectors)."""
        ids, mask = tokenize_prompts(self.tokenizer, prompts, self.device, self.prompt_format)
        return Rollout(ids, mask, completions=None, texts=[])

    def prefix(self, rollout: Rollout) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs_embeds, attention_mask) that generation continues from."""
        return self.model.get_input_embeddings()(rollout.prompt_ids), rollout.prompt_mask

    def prepare(self, rollout: Rollout):
        """Hook for variants to cache per-row tensors (no gradients) before sampling.

        A variant that runs the model over the prompt here may return that pass's KV cache: sampling
        then feeds only the prefix positions after it instead of encoding the prompt again.
        """
        return None

    @torch.no_grad()
    def rollout(
        self, prompts: list, sampling: SamplingConfig, generator: torch.Generator | None = None, group_size: int = 1
    ) -> Rollout:
        """Sample `group_size` completions of each prompt: a rollout of len(prompts) * group_size rows."""
        rollout = self.encode(prompts)
        cache = self.prepare(rollout)
        embeds, prefix_mask = self.prefix(rollout)
        if cache is not None:  # the cache holds the prefix's first positions: continue after them
            embeds = embeds[:, cache.get_seq_length() :]
        rollout.completions = sample(
            self.model,
            embeds,
            prefix_mask,
            sampling,
            self.stop_ids,
            self.tokenizer.pad_token_id,
            generator,
            past_key_values=cache,
            group_size=group_size,
        )
        rollout.repeat(group_size)
        rollout.texts = self.tokenizer.batch_decode(rollout.completions.ids, skip_special_tokens=True)
        return rollout

    def logprobs(self, rollout: Rollout, temperature: float) -> torch.Tensor:
        """log pi(token) of the rollout's sampled tokens, with gradients where parameters train (the prefix
        of each group runs once)."""
        G = rollout.group_size
        embeds, prefix_mask = self.prefix(rollout.heads() if G > 1 else rollout)
        return completion_logprobs(self.model, embeds, prefix_mask, rollout.completions, temperature, G)

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def regularizers(self, rollout: Rollout) -> dict[str, torch.Tensor]:
        """Extra loss terms (already weighted), added to the policy loss."""
        return {}

    def generate(self, prompts: list[str], max_new_tokens: int) -> list[str]:
        """Greedy completions, as the evaluator scores them."""
        return self.rollout(prompts, SamplingConfig(max_new_tokens=max_new_tokens, temperature=0.0)).texts

    def train(self, mode: bool = True) -> None:
        self.model.train(mode)
