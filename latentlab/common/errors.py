"""Errors a stage or command reports in one line (no traceback): the message says what is wrong and where, and
`describe_failure` turns any exception into that line."""

import errno
import os


class InputError(Exception):
    """A stage input is missing or malformed; the message names the file."""


class NonFiniteLossError(RuntimeError):
    """Training produced a NaN or infinite loss; continuing would only corrupt the weights."""


class NonFiniteLogitsError(NonFiniteLossError):
    """The model's logits are NaN or infinite while sampling: its weights diverged (or its inputs are broken).
    A NonFiniteLossError, so whatever reports or stops on a diverged loss does the same for it."""


class UnwritableOutputError(Exception):
    """An output cannot be written (a read-only or full disk, a file where a directory should be): found by a
    writability check before any work."""


def describe_failure(error: Exception, usage_errors: tuple[type[Exception], ...] = ()) -> tuple[int, str]:
    """(exit code, message) of a command's failure, for the one error boundary of stages and CLI commands: exit 2
    for `usage_errors` (bad params or options: rerunning will not fix them), 1 for the rest. Our own errors say what
    and where themselves; an OSError names its path, a damaged safetensors file its file; anything else is
    `<type>: <message>` on one line."""
    if isinstance(error, usage_errors):
        return 2, str(error)  # one line per bad key
    if isinstance(error, (InputError, UnwritableOutputError, NonFiniteLossError, ValueError)):
        return 1, _one_line(str(error))  # ValueError: the library's checks of values, worded for users
    if type(error).__name__ == "SafetensorError":
        return 1, _safetensors_problem(error)
    if isinstance(error, OSError) and error.filename is None and error.errno is None:
        return 1, _one_line(str(error))  # raised with a message of ours (FileNotFoundError("... no such model"))
    if isinstance(error, OSError):
        return 1, os_problem(error)
    return 1, _one_line(f"{type(error).__name__}: {error}")


def _one_line(message: str) -> str:
    return " ".join(message.split())


# what to do about an OSError, by its errno
_OS_HINTS = {
    errno.ENOSPC: "no space left on its disk: free some space and rerun",
    errno.EDQUOT: "the disk quota is exceeded: free some space and rerun",
    errno.EROFS: "the file system is read-only: make it writable (or run the stage in a writable copy of the project)"
    " and rerun",
    errno.EACCES: "permission denied: check the owner and mode of it and of its directory",
    errno.EPERM: "operation not permitted: check the owner and mode of it and of its directory",
    errno.ENOENT: "no such file or directory",
    errno.ENOTDIR: "a part of the path is a file, not a directory: move that file away",
    errno.EIO: "input/output error: the disk or network file system failed; check it and rerun",
}


def os_problem(error: OSError, path=None) -> str:
    """`<path>: <what is wrong and what to do>` for an OSError (its own path unless `path` is given)."""
    where = path if path is not None else error.filename
    hint = _OS_HINTS.get(error.errno) or f"{error.strerror or error} ({errno.errorcode.get(error.errno, 'OSError')})"
    return f"{os.fsdecode(where)}: {hint}" if where is not None else hint


def _safetensors_problem(error: Exception) -> str:
    """A safetensors error names no file: the innermost frame of the traceback that held a *.safetensors path
    (safetensors' load_file / save_file, transformers' loader) does."""
    file, trace = None, error.__traceback__
    while trace is not None:
        for value in trace.tb_frame.f_locals.values():
            if isinstance(value, str | os.PathLike) and os.fspath(value).endswith(".safetensors"):
                file = os.fspath(value)
        trace = trace.tb_next
    file = file or "a safetensors file"
    text = _one_line(str(error))
    if "serializ" in text and "deserializ" not in text:  # writing
        if "os error 28" in text:
            return f"{file}: {_OS_HINTS[errno.ENOSPC]} ({text})"
        return f"{file} cannot be written ({text})"
    return f"{file}: the file is damaged ({text}): rerun the stage that wrote it, or restore it with `dvc checkout`"
