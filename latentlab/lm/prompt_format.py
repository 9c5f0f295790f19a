"""How a prompt's text becomes the token ids a model continues: `raw` or `chat`.

- raw: the text as it is, after the special tokens the checkpoint's tokenizer puts in front of any text it encodes
  (Llama 3's `<|begin_of_text|>`; nothing for Qwen, GPT-2 or the scratch character tokenizer). A special token the
  tokenizer would append (an end-of-sequence) is left out: a prompt is continued, not ended.
- chat: the tokenizer's chat template, one user turn (after a system turn when `system` is set) and the generation
  prompt of the assistant's turn, as `apply_chat_template(..., add_generation_prompt=True)` renders it; the
  template writes its own special tokens (BOS included), so none is added again.

Every path that encodes a prompt the model continues goes through `PromptFormat.encode`: the sampler's prompts
(GRPO, PPO, injection, surgery, evaluation), SFT's prompt + answer examples and the extractor (`label`, `latentlab
label` / `serve`). Completions, answers and NLA's explanation texts are text after a prompt and stay raw.
"""

from collections.abc import Sequence
from typing import Literal

from latentlab.common.config import Config
from latentlab.lm.tokenizer import token_ids


class PromptFormat(Config):
    format: Literal["raw", "chat"] = "raw"
    """raw: the prompt text, after the special tokens the tokenizer adds in front (BOS); chat: the tokenizer's chat
    template around it as a user turn, ending with the assistant's generation prompt."""
    system: str | None = None
    """chat only: a system prompt, as the first turn (null: none; the template may still write its default)."""

    def render(self, tokenizer, prompts: Sequence[str]) -> list[str]:
        """The chat-formatted texts (special tokens written out); raw prompts unchanged."""
        if self.format == "raw":
            return list(prompts)
        if not getattr(tokenizer, "chat_template", None):
            name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
            raise ValueError(
                f"prompt format chat: the tokenizer of {name} has no chat template (use format raw, or a checkpoint "
                "whose tokenizer_config.json or chat_template.jinja holds one)"
            )
        system = [{"role": "system", "content": self.system}] if self.system is not None else []
        conversations = [system + [{"role": "user", "content": prompt}] for prompt in prompts]
        return tokenizer.apply_chat_template(conversations, add_generation_prompt=True, tokenize=False)

    def encode(self, tokenizer, prompts: Sequence[str]) -> list[list[int]]:
        """Token ids of each prompt, ready to be continued."""
        if self.format == "chat":
            return token_ids(tokenizer, self.render(tokenizer, prompts))
        prefix = leading_special_ids(tokenizer)
        ids = token_ids(tokenizer, prompts)
        return [prefix + row for row in ids] if prefix else ids

    def encode_answers(self, tokenizer, prompts: Sequence[str], answers: Sequence[str]) -> list[list[int]]:
        """Token ids of each answer as the model should write it after its encoded prompt, ending its turn. raw:
        the answer and end-of-sequence. chat: the template's assistant turn after the generation prompt, up to and
        including the token that ends the turn (Qwen3's template puts an empty <think> block before the answer)."""
        if self.format == "raw":
            return [row + [tokenizer.eos_token_id] for row in token_ids(tokenizer, answers)]
        openings = self.render(tokenizer, prompts)
        system = [{"role": "system", "content": self.system}] if self.system is not None else []
        turns = [
            system + [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]
            for prompt, answer in zip(prompts, answers, strict=True)
        ]
        whole = tokenizer.apply_chat_template(turns, tokenize=False)
        for opening, text in zip(openings, whole):
            if not text.startswith(opening):
                raise ValueError(
                    f"prompt format chat: the chat template does not write an answered turn as the generation prompt "
                    f"followed by the answer ({opening!r} is not the start of {text!r})"
                )
        tails = token_ids(tokenizer, [text[len(opening) :] for opening, text in zip(openings, whole)])
        special = {index for index, token in tokenizer.added_tokens_decoder.items() if token.special}
        ended = []
        for row in tails:
            end = next((i for i, token in enumerate(row) if token in special), None)
            if end is None:
                raise ValueError("prompt format chat: the chat template ends an assistant turn with no special token")
            ended.append(row[: end + 1])
        return ended

    def end_id(self, tokenizer) -> int:
        """The token that ends the model's answer: end-of-sequence (raw), the template's end of turn (chat: Qwen's
        <|im_end|>, Llama 3's <|eot_id|>). Samplers stop on it besides the checkpoint's own stop ids."""
        if self.format == "raw":
            return tokenizer.eos_token_id
        return self.encode_answers(tokenizer, ["0"], ["0"])[0][-1]

    def describe(self) -> str:
        """One line for logs and stored metadata: 'raw', 'chat' or 'chat, system: ...'."""
        return self.format if self.system is None else f"{self.format}, system: {self.system!r}"


RAW = PromptFormat()


def add_prompt_arguments(parser) -> None:
    """`--prompt-format raw|chat` and `--system-prompt`, for the commands that encode prompts (label, serve)."""
    parser.add_argument(
        "--prompt-format",
        default="raw",
        choices=["raw", "chat"],
        help="raw: the text (after the tokenizer's BOS); chat: the tokenizer's chat template, a user turn (default: raw)",
    )
    parser.add_argument("--system-prompt", help="with --prompt-format chat: a system turn before the user's")


def prompt_format_of(args) -> PromptFormat:
    """The PromptFormat of `add_prompt_arguments`' options; a system prompt without chat is refused."""
    if args.system_prompt is not None and args.prompt_format != "chat":
        raise ValueError("--system-prompt needs --prompt-format chat")
    return PromptFormat(format=args.prompt_format, system=args.system_prompt)


_PROBE = "0"


def leading_special_ids(tokenizer) -> list[int]:
    """The ids the tokenizer puts in front of any text it encodes with its special tokens (its post-processor's
    BOS), found by encoding a probe both ways: [128000] for Llama 3's hub tokenizer, [] for Qwen and GPT-2."""
    plain = tokenizer(_PROBE, add_special_tokens=False)["input_ids"]
    full = tokenizer(_PROBE, add_special_tokens=True)["input_ids"]
    for start in range(len(full) - len(plain) + 1):
        if full[start : start + len(plain)] == plain:
            return list(full[:start])
    raise ValueError(f"the tokenizer encodes {_PROBE!r} without its special tokens to {plain}, with them to {full}")
