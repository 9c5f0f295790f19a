"""Write-then-rename outputs, so a killed or failed stage never leaves a valid-looking artifact.

A stage writes into a hidden sibling (`.name.partial-<pid>`) and only a clean exit renames it onto
the real path. DVC then sees either the complete output or none at all, and a rerun starts over.
Partials left behind by a SIGKILL are swept the next time the same output is written.
"""

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


@contextmanager
def atomic_output(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to `target`; move it onto `target` only if the block succeeds.

    The temporary path does not exist yet: the caller creates a file or a directory there.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    for stale in target.parent.glob(f".{target.name}.partial-*"):
        _remove(stale)
    partial = target.parent / f".{target.name}.partial-{os.getpid()}"
    try:
        yield partial
        if not partial.exists():
            raise FileNotFoundError(f"nothing was written for {target}")
        _remove(target)
        os.replace(partial, target)
    finally:
        if partial.exists():
            _remove(partial)
