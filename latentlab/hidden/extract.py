"""Hidden states of chosen layers over batches of prompts: one core for every mode.

`Extractor` serves the `label` stage (latentlab/labelling.py), `latentlab serve` and re-extraction:

- prompt (`tokens: 1`): one forward pass over the prompt, deterministic; pooled over the prompt's
  positions.
- generate (`tokens: N > 1`): N tokens from the shared sampler; pooled over the states at the
  positions that produced each generated token: the last prompt position for token 0, then the
  position of each generated token, up to and including the one that produced end-of-sequence.
  These are exactly `generate(output_hidden_states=True)`'s `hidden_states[t][layer][:, -1]`, read
  with forward hooks while sampling: only the chosen layers are kept, but of every step, in one
  `(B, N, L, H)` float32 buffer (N * L * H * 4 bytes a row), which is pooled once sampling ends and is
  also the source of the float16 `tokens` array. No step materialises every layer; no second pass runs.
- text (re-extraction): prompt + given completion tokens in one teacher-forced pass, pooled over
  the same positions as generate, so re-extracting a generated text reproduces its vector.

Every mode pools with `latentlab.lm.pooling.pool` (`cfg.pooling`: mean by default; last, max, cls), and
padding and positions after end-of-sequence are never read. Layers are numbered as
`output_hidden_states` numbers them (0: embeddings, -1: the final norm's output).
"""

import itertools
from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Literal

import numpy as np
import pyarrow as pa
import torch
from pydantic import Field, field_validator

from latentlab.common.config import Config
from latentlab.common.runtime import to_device
from latentlab.lm.capture import LayerCapture, decoder_blocks, resolve_layers
from latentlab.lm.modeling import stop_token_ids
from latentlab.lm.padding import pad_flat
from latentlab.lm.pooling import LEARNED, Pooling, pool
from latentlab.lm.prompt_format import RAW, PromptFormat
from latentlab.lm.sampling import SamplingConfig, positions_from_mask, sample
from latentlab.lm.tokenizer import token_ids, unknown_token_id

POSITIONS = {
    "prompt": "the prompt's tokens",
    "generate": "the positions that produced each generated token (last prompt position, then each "
    "generated token), up to and including end-of-sequence",
    "generate_fixed": "the positions that produced each of the N generated tokens (last prompt position, then "
    "each generated token); end-of-sequence stops no row",
    "text": "the positions that produce each given completion token (last prompt position, then each "
    "completion token but the last), as in generate",
}


class ExtractConfig(Config):
    layers: list[int] = Field(default_factory=lambda: [-1], min_length=1)
    """Hidden states to keep, numbered as output_hidden_states: 0 embeddings, -1 the final norm's output."""
    tokens: int = Field(1, gt=0)
    """1: prompt only (one forward pass, pooled over the prompt); N > 1: generate N tokens, pool over them."""
    temperature: float = Field(1.0, ge=0)
    """Sampling temperature when generating (0: greedy)."""
    top_p: float = Field(1.0, gt=0, le=1)
    """Nucleus sampling mass when generating."""
    stop_at_eos: bool = True
    """Generate mode: a row stops at end-of-sequence (its pooling ends there). False: every row gets exactly
    `tokens` tokens and the pooling is over all of them, end-of-sequence being an ordinary token (the reference's
    fixed-length setting, e.g. 256 tokens; `generate(eos_token_id=None)`)."""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """Compute dtype of the model (pooled sums are accumulated in float32 either way)."""
    pooling: Pooling = "mean"
    """How each row's states become its pooled vector (latentlab/lm/pooling.py): mean | last | max | cls
    (weighted needs learned scores: the NLA critic's only)."""

    @field_validator("pooling")
    @classmethod
    def _no_learned_scores(cls, pooling: str) -> str:
        if pooling in LEARNED:
            usable = ", ".join(p for p in Pooling.__args__ if p not in LEARNED)
            raise ValueError(f"{pooling} pooling needs learned scores, which extraction has none of; use {usable}")
        return pooling

    @property
    def mode(self) -> str:
        return "prompt" if self.tokens == 1 else "generate"

    @property
    def positions(self) -> str:
        """What each row is pooled over, in words (POSITIONS)."""
        return POSITIONS["generate_fixed" if self.mode == "generate" and not self.stop_at_eos else self.mode]


def add_pooling_argument(parser) -> None:
    """`--pooling`, for the commands that extract (`latentlab label`, `serve`): the modes extraction can use."""
    usable = [p for p in Pooling.__args__ if p not in LEARNED]
    parser.add_argument("--pooling", default="mean", choices=usable, help="how each row's states are pooled")


@dataclass
class TokenRows:
    """Token ids of many rows, compact: one flat int32 array and row offsets, not a Python list per
    row, so a dataset's tokens cost 4 bytes each (and no garbage-collector work) however many rows."""

    flat: np.ndarray  # (total,) int32
    offsets: np.ndarray  # (N + 1,) int64: row i is flat[offsets[i]:offsets[i + 1]]

    @classmethod
    def from_lists(cls, rows: Sequence[Sequence[int]]) -> "TokenRows":
        lengths = np.fromiter(map(len, rows), dtype=np.int64, count=len(rows))
        flat = np.fromiter(itertools.chain.from_iterable(rows), dtype=np.int32, count=int(lengths.sum()))
        return cls(flat, np.concatenate([[0], np.cumsum(lengths)]))

    @classmethod
    def concat(cls, parts: Sequence["TokenRows"]) -> "TokenRows":
        starts = np.cumsum([0] + [len(p.flat) for p in parts[:-1]])
        offsets = [parts[0].offsets[:1]] + [p.offsets[1:] + start for p, start in zip(parts, starts)]
        return cls(np.concatenate([p.flat for p in parts]), np.concatenate(offsets))

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def __getitem__(self, rows: slice) -> "TokenRows":
        start, stop, _ = rows.indices(len(self))
        first, last = self.offsets[start], self.offsets[stop]
        return TokenRows(self.flat[first:last], self.offsets[start : stop + 1] - first)

    def take(self, rows: np.ndarray) -> "TokenRows":
        """Rows `rows` (indices), in that order."""
        lengths = self.lengths[rows]
        offsets = np.concatenate([[0], np.cumsum(lengths)])
        # element k of new row i sits at self.offsets[rows[i]] + k, i.e. at its new place + a shift per row
        index = np.repeat(self.offsets[rows] - offsets[:-1], lengths) + np.arange(offsets[-1])
        return TokenRows(self.flat[index], offsets)

    def to_arrow(self) -> pa.LargeListArray:
        """The rows as one Arrow list array over the same buffers (a Parquet list column, no copy per row)."""
        return pa.LargeListArray.from_arrays(pa.array(self.offsets, pa.int64()), pa.array(self.flat, pa.int32()))

    def arrays(self) -> list[np.ndarray]:
        """One array per row (for a Parquet list column)."""
        return np.split(self.flat, self.offsets[1:-1])

    def padded(self, pad_id: int, device, left: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """(ids, mask) `(N, width)`, padded on the left (prompts: every row ends at the last column,
        where generation starts) or on the right (completions); one copy, no loop per row."""
        ids, mask = pad_flat(torch.from_numpy(self.flat), torch.from_numpy(self.lengths), pad_id, left)
        return to_device(ids, device), to_device(mask, device)  # pinned, non-blocking on CUDA


@dataclass
class Extracted:
    """One batch's result, on the CPU."""

    pooled: torch.Tensor  # (B, L, H) float32
    counts: torch.Tensor  # (B,) positions pooled over (generate: tokens sampled, end-of-sequence included)
    tokens: torch.Tensor | None = None  # (B, T, L, H) float16, zeros where not pooled
    token_ids: TokenRows | None = None  # generate: sampled ids, end-of-sequence included
    ended: torch.Tensor | None = None  # generate: the last token is end-of-sequence
    log_prob: torch.Tensor | None = None  # generate: sum of the sampled tokens' log-probs

    @classmethod
    def in_row_order(cls, parts: Sequence["Extracted"], order: np.ndarray) -> "Extracted":
        """Batches that ran rows `order` (the parts' rows one after another are rows order[0], order[1],
        ...) as one result whose row i is row i."""
        inverse = np.argsort(order)  # row i is row inverse[i] of the batches laid end to end

        def in_order(name: str):
            if getattr(parts[0], name) is None:
                return None
            if name == "token_ids":
                return TokenRows.concat([p.token_ids for p in parts]).take(inverse)
            return torch.cat([getattr(p, name) for p in parts])[torch.from_numpy(inverse)]

        return cls(**{field.name: in_order(field.name) for field in fields(cls)})


class Extractor:
    """Pooled hidden states of the configured layers for batches of prompts (see the module doc)."""

    def __init__(self, model, tokenizer, cfg: ExtractConfig, prompt_format: PromptFormat = RAW):
        self.model, self.tokenizer, self.cfg = model, tokenizer, cfg
        self.prompt_format = prompt_format  # how prompt texts become ids: raw, or the chat template
        try:
            self.layer_indices = resolve_layers(cfg.layers, len(decoder_blocks(model)[0]))
        except IndexError as error:
            raise ValueError(f"layers: {error}") from None
        self.hidden_size = model.config.hidden_size
        self.context = getattr(model.config, "max_position_embeddings", None)
        self.sampling = SamplingConfig(
            max_new_tokens=cfg.tokens, temperature=cfg.temperature, top_p=cfg.top_p, stop_at_eos=cfg.stop_at_eos
        )
        # the checkpoint's stop ids, and the end of a chat turn (Llama 3's <|eot_id|>) in chat format
        self.stop_ids = stop_token_ids(model, tokenizer, prompt_format.end_id(tokenizer))

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def encode_prompts(self, prompts: Sequence[str], chunk: int = 4096) -> TokenRows:
        """Token ids of each prompt in the extractor's `prompt_format`. In chunks: the tokenizer's per-row
        objects would otherwise cost about a kilobyte for every row of a dataset at once."""
        return self._encode(prompts, lambda texts: self.prompt_format.encode(self.tokenizer, texts), chunk)

    def encode(self, texts: Sequence[str], chunk: int = 4096) -> TokenRows:
        """Token ids of each text as it is, no special tokens added (completions)."""
        return self._encode(texts, lambda texts: token_ids(self.tokenizer, texts), chunk)

    @staticmethod
    def _encode(texts: Sequence[str], encode, chunk: int) -> TokenRows:
        parts = [TokenRows.from_lists(encode(texts[i : i + chunk])) for i in range(0, len(texts), chunk)]
        return TokenRows.concat([TokenRows.from_lists([])] + parts)

    def decode(self, token_ids: TokenRows) -> list[str]:
        """The text of generated tokens (special tokens skipped). Kept out of `__call__` so the
        label stage decodes in its writer thread, off the path of the next batch."""
        return self.tokenizer.batch_decode([row.tolist() for row in token_ids.arrays()], skip_special_tokens=True)

    def completion_ids(self, texts: Sequence[str], ended: Sequence[bool] | None = None) -> TokenRows:
        """Token ids of given completions, with end-of-sequence appended where `ended`. Decoding and
        encoding again is exact only where the tokenizer allows it (e.g. no special tokens in the
        middle); the labels table keeps `token_ids` for exact re-extraction."""
        eos = self.tokenizer.eos_token_id
        encoded = self.encode(texts)
        if ended is None:
            return encoded
        return TokenRows.from_lists([list(x) + [eos] if e else list(x) for x, e in zip(encoded.arrays(), ended)])

    def check(self, prompts: TokenRows, ids: Sequence, completions: TokenRows | None = None) -> int:
        """Refuse, before any work, what cannot be labelled (`ids` name the rows in messages);
        return T, the positions per row of the `tokens` array."""
        if len(prompts) == 0:
            raise ValueError("no rows to label: the dataset is empty")
        lengths = prompts.lengths
        if completions is not None:
            extra = completions.lengths
        else:
            extra = np.full(len(prompts), 0 if self.cfg.mode == "prompt" else self.cfg.tokens)
        checks = [(lengths == 0, lambda row: "the prompt is empty after tokenization")]
        unk = unknown_token_id(self.tokenizer)  # None where unk is eos or bos (GPT-2): a real token, not unknown
        if unk is not None:  # a character the vocabulary lacks would be silently read as <unk>
            row_of_token = np.repeat(np.arange(len(prompts)), lengths)
            unknown = np.bincount(row_of_token[prompts.flat == unk], minlength=len(prompts))
            checks.append(
                (
                    unknown > 0,
                    lambda row: (
                        f"{unknown[row]} character(s) outside the model's vocabulary (they would be read as "
                        f"{self.tokenizer.unk_token})"
                    ),
                )
            )
        if completions is not None:
            checks.append((extra == 0, lambda row: "no completion tokens to re-extract"))
        if self.context is not None:
            checks.append(
                (
                    lengths + extra > self.context,
                    lambda row: (
                        f"{lengths[row]} prompt tokens + {extra[row]} more exceed the model's context of "
                        f"{self.context} positions (max_position_embeddings)"
                    ),
                )
            )
        for bad, message in checks:
            if bad.any():
                row = int(np.argmax(bad))
                raise ValueError(f"row id={ids[row]}: {message(row)}")
        if completions is not None:
            return int(extra.max())
        return int(lengths.max()) if self.cfg.mode == "prompt" else self.cfg.tokens

    def __call__(
        self,
        prompts: Sequence[str] | TokenRows,
        generator: torch.Generator | None = None,
        store_tokens: bool = False,
        width: int | None = None,
        completions: TokenRows | None = None,
    ) -> Extracted:
        """Pool one batch of prompts (text, or token ids from `encode_prompts`). `width` is T of the
        `tokens` array (default: this batch's widest row)."""
        if not isinstance(prompts, TokenRows):
            prompts = self.encode_prompts(prompts)
        ids, mask = prompts.padded(self.tokenizer.pad_token_id, self.device, left=True)
        with torch.no_grad(), LayerCapture(self.model, self.cfg.layers) as capture:
            if completions is not None:
                out = self._teacher_forced(ids, mask, completions, capture)
            elif self.cfg.mode == "prompt":
                out = self._prompt(ids, mask, capture)
            else:
                return self._generate(ids, mask, capture, generator, store_tokens)
        states, keep = out  # (B, T, L, H), (B, T)
        pooled = pool(states, keep, self.cfg.pooling)
        tokens = None
        if store_tokens:
            tokens = _left_align(states, keep, width or states.shape[1]).to(torch.float16).cpu()
        return Extracted(pooled.cpu(), keep.sum(1).cpu(), tokens)

    def _forward(self, ids, mask, capture) -> torch.Tensor:
        # logits of the last position only: the vocabulary projection is not what we are after
        self.model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=positions_from_mask(mask),
            use_cache=False,
            logits_to_keep=1,
        )
        return capture.stacked()

    def _prompt(self, ids, mask, capture):
        return self._forward(ids, mask, capture), mask.bool()

    def _teacher_forced(self, ids, mask, completions, capture):
        comp, comp_mask = completions.padded(self.tokenizer.pad_token_id, self.device, left=False)
        states = self._forward(torch.cat([ids, comp], 1), torch.cat([mask, comp_mask], 1), capture)
        start = ids.shape[1] - 1  # the last prompt position produces completion token 0
        return states[:, start : start + comp.shape[1]], comp_mask.bool()

    def _generate(self, ids, mask, capture, generator, store_tokens) -> Extracted:
        batch, layers = ids.shape[0], len(self.cfg.layers)
        # the chosen layers' states of every step (zeros where a row had ended) and which positions count
        states = torch.zeros(
            (batch, self.cfg.tokens, layers, self.hidden_size), dtype=torch.float32, device=self.device
        )
        keep = torch.zeros((batch, self.cfg.tokens), dtype=torch.bool, device=self.device)

        def on_token(t: int, step: torch.Tensor, alive: torch.Tensor) -> None:  # step: (B, L, H)
            if self.cfg.stop_at_eos:  # without it every row is alive at every step
                step = torch.where(alive[:, None, None], step, 0)
                keep[:, t] = alive
            else:
                keep[:, t] = True
            states[:, t] = step

        embeds = self.model.get_input_embeddings()(ids)
        stop_ids = self.stop_ids
        done = sample(
            self.model,
            embeds,
            mask,
            self.sampling,
            stop_ids,
            self.tokenizer.pad_token_id,
            generator,
            capture=capture,
            on_token=on_token,
        )
        counts = done.lengths
        # the last token is end-of-sequence (with stop_at_eos the only one; without, one may come earlier too)
        last = done.ids.gather(1, (counts - 1)[:, None]).squeeze(1)
        ended = torch.isin(last, torch.tensor(stop_ids, device=last.device))
        return Extracted(
            pooled=pool(states, keep, self.cfg.pooling).cpu(),
            counts=counts.cpu(),
            tokens=states.to(torch.float16).cpu() if store_tokens else None,
            token_ids=TokenRows(
                done.ids[done.mask].int().cpu().numpy(), np.concatenate([[0], counts.cumsum(0).cpu().numpy()])
            ),
            ended=ended.cpu(),
            log_prob=done.logprobs.sum(1).cpu(),
        )


def _left_align(states: torch.Tensor, keep: torch.Tensor, width: int) -> torch.Tensor:
    """`(B, T', L, H)` -> `(B, width, L, H)` with each row's kept positions first, zeros after."""
    batch, _, layers, hidden = states.shape
    first = keep.long().argmax(1)  # kept positions are contiguous: left padding, or right padding after
    index = (first[:, None] + torch.arange(width, device=states.device)).clamp(max=states.shape[1] - 1)
    gathered = states.gather(1, index[:, :, None, None].expand(batch, width, layers, hidden))
    valid = torch.arange(width, device=states.device)[None] < keep.sum(1, keepdim=True)
    return torch.where(valid[:, :, None, None], gathered, 0)
