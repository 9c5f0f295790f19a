"""Errors a stage reports in one line (no traceback): the message says what is wrong and where."""


class InputError(Exception):
    """A stage input is missing or malformed; the message names the file."""


class NonFiniteLossError(RuntimeError):
    """Training produced a NaN or infinite loss; continuing would only corrupt the weights."""
