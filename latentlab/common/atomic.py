"""Write-then-rename outputs, so a killed or failed stage never leaves a valid-looking artifact.

A stage writes into a hidden sibling (`.name.partial-<pid>`) and only a clean exit renames it onto
the real path. DVC then sees either the complete output or none at all, and a rerun starts over.
Partials left behind by a SIGKILL are swept the next time the same output is written.

What stands at the target is replaced only when it is of the same kind (a directory by a directory,
a file by a file), and, when the caller says what it may replace (`replaces`: a predicate, or the
name of a marker file the directory must hold), only when it is that: anything else is refused with
an `OutputError` before any work, and nothing is removed. The output gets the modes a plain `open()`
and `mkdir()` give (0666 / 0777 less the umask), whatever the writer used: safetensors and
`tempfile` make private 0600 files and 0700 directories.
"""

import os
import shutil
import stat
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path


class OutputError(ValueError):
    """An output would replace something that is not the caller's to replace; the message names it."""


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def _exists(path: Path) -> bool:
    return path.exists() or path.is_symlink()


def _kind(path: Path) -> str:
    return "directory" if path.is_dir() else "file"


def _check_replaceable(target: Path, replaces: Callable[[Path], bool] | str | None, what: str | None) -> None:
    """Refuse (OutputError) to replace what stands at `target` unless `replaces` allows it."""
    if replaces is None or not _exists(target):
        return
    allowed = (target / replaces).is_file() if isinstance(replaces, str) else replaces(target)
    if not allowed:
        what = what or (f"a directory holding {replaces}" if isinstance(replaces, str) else "an output of this kind")
        raise OutputError(
            f"{target} exists and is not {what}; nothing was written: remove it yourself or write elsewhere"
        )


@contextmanager
def atomic_output(
    target: str | os.PathLike,
    replaces: Callable[[Path], bool] | str | None = None,
    what: str | None = None,
) -> Iterator[Path]:
    """Yield a temporary path next to `target`; move it onto `target` only if the block succeeds.

    The temporary path does not exist yet: the caller creates a file or a directory there. What
    stands at `target` is replaced only by an output of the same kind (a directory by a directory,
    a file by a file) and, with `replaces` (a predicate of the existing path, or the name of a
    marker file the existing directory must hold; `what` describes it in the message), only if it
    passes; both are checked before the block runs (`replaces`) and again before the rename.
    """
    target = Path(target)
    _check_replaceable(target, replaces, what)
    target.parent.mkdir(parents=True, exist_ok=True)
    for stale in target.parent.glob(f".{target.name}.partial-*"):
        _remove(stale)
    partial = target.parent / f".{target.name}.partial-{os.getpid()}"
    try:
        yield partial
        if not _exists(partial):
            raise FileNotFoundError(f"nothing was written for {target}")
        if _exists(target):
            if partial.is_dir() != target.is_dir():
                raise OutputError(
                    f"{target} is a {_kind(target)}; it is not replaced by a {_kind(partial)}: "
                    "remove it yourself or write elsewhere"
                )
            _check_replaceable(target, replaces, what)
        normal_modes(partial)
        _remove(target)
        os.replace(partial, target)
    finally:
        if _exists(partial):
            _remove(partial)


_umask_lock = threading.Lock()


def umask() -> int:
    """The process's umask, read without changing it where Linux tells it (/proc), else set and restored."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    with _umask_lock:
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


def normal_modes(path: str | os.PathLike) -> None:
    """Give `path` and everything under it the modes open() and mkdir() give: files 0666 and
    directories (and files with an execute bit) 0777, less the umask. Symbolic links are left alone."""
    mask = umask()
    path = Path(path)
    paths = [path]
    if path.is_dir() and not path.is_symlink():
        for root, directories, files in os.walk(path):  # links to directories are not followed
            paths += [Path(root, name) for name in (*directories, *files)]
    for item in paths:
        if item.is_symlink():
            continue
        mode = item.stat().st_mode
        executable = stat.S_ISDIR(mode) or mode & (stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
        wanted = (0o777 if executable else 0o666) & ~mask
        if stat.S_IMODE(mode) != wanted:
            os.chmod(item, wanted)
