"""Errors a stage reports in one line (no traceback): the message says what is wrong and where."""


class InputError(Exception):
    """A stage input is missing or malformed; the message names the file."""


class NonFiniteLossError(RuntimeError):
    """Training produced a NaN or infinite loss; continuing would only corrupt the weights."""


class NonFiniteLogitsError(NonFiniteLossError):
    """The model's logits are NaN or infinite while sampling: its weights diverged (or its inputs are broken).
    A NonFiniteLossError, so whatever reports or stops on a diverged loss does the same for it."""
