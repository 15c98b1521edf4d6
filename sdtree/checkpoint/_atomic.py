"""Write a checkpoint under a temporary name and rename it into place at the end.

A failed or interrupted write leaves nothing behind: not the temporary file or
directory, not the parent directories it created, and not a half-written
destination. An existing destination is replaced only with ``force=True``.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

from sdtree.errors import DestinationExistsError

__all__ = ["check_destination", "atomic_destination", "temporary_name", "commit", "remove"]


def check_destination(dst: Path, *, force: bool, fn: str) -> None:
    """Raise unless ``dst`` is free, or may be replaced (``force``)."""
    if force or not os.path.lexists(dst):
        return
    kind = "directory" if dst.is_dir() else "file"
    raise DestinationExistsError(
        f"{fn}: the destination {str(dst)!r} already exists (a {kind}). Pass force=True "
        "(--force on the command line) to replace it, or choose another path."
    )


def temporary_name(dst: Path) -> Path:
    """A fresh hidden name beside ``dst`` (same directory, so renaming is atomic)."""
    return dst.parent / f".{dst.name}.sdtree-{uuid.uuid4().hex[:12]}.tmp"


def _make_parents(directory: Path) -> list[Path]:
    """Create ``directory`` and its missing parents; return those created, deepest first."""
    missing = []
    here = directory
    while not here.exists():
        missing.append(here)
        here = here.parent
    directory.mkdir(parents=True, exist_ok=True)
    return missing


def remove(path: Path) -> None:
    """Remove a file or directory tree if it exists."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif os.path.lexists(path):
        path.unlink()


def commit(tmp: Path, dst: Path, *, force: bool, fn: str) -> None:
    """Move ``tmp`` to ``dst``, replacing an existing ``dst`` only when ``force``.

    A file replaces a file atomically; otherwise the old ``dst`` is first moved
    aside, then removed once ``tmp`` is in place.
    """
    check_destination(dst, force=force, fn=fn)
    if not os.path.lexists(dst) or (tmp.is_file() and dst.is_file() and not dst.is_symlink()):
        os.replace(tmp, dst)
        return
    aside = temporary_name(dst)
    os.replace(dst, aside)
    try:
        os.replace(tmp, dst)
    except BaseException:
        os.replace(aside, dst)
        raise
    remove(aside)


@contextlib.contextmanager
def atomic_destination(dst: Path, *, force: bool, directory: bool, fn: str) -> Iterator[Path]:
    """Yield a temporary path to write; on success rename it to ``dst``.

    Raises:
        DestinationExistsError: ``dst`` exists and ``force`` is false (checked
            before anything is written, and again at the end).
    """
    check_destination(dst, force=force, fn=fn)
    created = _make_parents(dst.parent)
    tmp = temporary_name(dst)
    try:
        if directory:
            tmp.mkdir()
        yield tmp
        commit(tmp, dst, force=force, fn=fn)
    except BaseException:
        remove(tmp)
        for parent in created:
            with contextlib.suppress(OSError):
                parent.rmdir()
        raise
