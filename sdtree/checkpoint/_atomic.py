"""Write a checkpoint under a temporary name and rename it into place at the end.

A failed or interrupted write leaves nothing behind: not the temporary file or
directory, not the parent directories it created, and not a half-written
destination. An existing destination is replaced only with ``force=True``.

A write killed outright (SIGKILL, power loss) cannot clean up: what it leaves
is a hidden temporary ``.<name>.sdtree-tmp-<pid>-<random>`` beside the
destination, never the destination itself. The next write to the same
destination removes such leftovers once their process is gone.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import re
import shutil
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from sdtree.errors import DestinationError, DestinationExistsError

__all__ = [
    "check_destination",
    "check_not_source",
    "atomic_destination",
    "temporary_name",
    "remove_stale_temporaries",
    "commit",
    "remove",
    "start_writeback",
]

_TEMPORARY = ".sdtree-tmp-"
_OWNER = re.compile(r"(\d+)-[0-9a-f]+")


def check_destination(dst: Path, *, force: bool, fn: str) -> None:
    """Raise unless ``dst`` is free, or may be replaced (``force``)."""
    if force or not os.path.lexists(dst):
        return
    kind = "directory" if dst.is_dir() else "file"
    raise DestinationExistsError(
        f"{fn}: the destination {str(dst)!r} already exists (a {kind}). Pass force=True "
        "(--force on the command line) to replace it, or choose another path."
    )


def check_not_source(src: Path, dst: Path, *, fn: str) -> None:
    """Raise if writing ``dst`` would replace ``src``: the same path (or file),
    or a directory that holds it. Checked before anything is read or written,
    whatever ``force`` says."""
    source, target = os.path.realpath(src), os.path.realpath(dst)
    same = source == target or (os.path.exists(src) and os.path.exists(dst) and os.path.samefile(src, dst))
    if same or source.startswith(target.rstrip(os.sep) + os.sep):
        what = "is the source" if same else "holds the source"
        raise DestinationError(
            f"{fn}: the destination {str(dst)!r} {what} {str(src)!r}, so writing it would destroy "
            "what is being read (even with force=True). Choose another destination. Nothing was written."
        )


def temporary_name(dst: Path) -> Path:
    """A fresh hidden name beside ``dst`` (same directory, so renaming is atomic)
    that names this process, so a later write can tell a leftover from a live one."""
    return dst.parent / f".{dst.name}{_TEMPORARY}{os.getpid()}-{uuid.uuid4().hex[:12]}"


def remove_stale_temporaries(dst: Path) -> None:
    """Remove the temporaries that writes to ``dst`` left when they were killed
    (their process is gone)."""
    prefix = f".{dst.name}{_TEMPORARY}"
    for name in os.listdir(dst.parent):
        owner = _OWNER.fullmatch(name[len(prefix) :]) if name.startswith(prefix) else None
        if owner is not None and not _alive(int(owner.group(1))):
            remove(dst.parent / name)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    except (OverflowError, ValueError):
        return False
    return True


def _missing_parents(directory: Path) -> list[Path]:
    """``directory`` and those of its parents that do not exist, deepest first."""
    missing = []
    here = directory
    while not os.path.lexists(here) and here != here.parent:
        missing.append(here)
        here = here.parent
    return missing


def remove(path: Path) -> None:
    """Remove a file or directory tree if it exists."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif os.path.lexists(path):
        path.unlink()


def commit(tmp: Path, dst: Path, *, force: bool, fn: str, sync: bool) -> None:
    """Move ``tmp`` to ``dst``, replacing an existing ``dst`` only when ``force``.

    A file replaces a file atomically; otherwise the old ``dst`` is first moved
    aside, then removed once ``tmp`` is in place. With ``sync``, what ``tmp``
    holds is flushed to the disk first (``fsync`` of each file and directory)
    and the rename after: once this returns, a crash leaves ``dst`` complete
    (without it, the disk may hold the new name before the data).
    """
    check_destination(dst, force=force, fn=fn)
    if sync:
        _sync_tree(tmp)
    if not os.path.lexists(dst) or (tmp.is_file() and dst.is_file() and not dst.is_symlink()):
        os.replace(tmp, dst)
    else:
        aside = temporary_name(dst)
        os.replace(dst, aside)
        try:
            os.replace(tmp, dst)
        except BaseException:
            os.replace(aside, dst)
            raise
        remove(aside)
    if sync:
        _fsync(dst.parent)


def _sync_tree(path: Path) -> None:
    """``fsync`` the file ``path``, or every file and directory under it."""
    if not path.is_dir():
        _fsync(path)
        return
    for root, _, files in os.walk(path, topdown=False):
        for name in files:
            _fsync(Path(root, name))
        _fsync(Path(root))


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sync_file_range() -> Any:
    """libc's ``sync_file_range`` (Linux), or None."""
    if sys.platform != "linux":
        return None
    try:
        function = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return None
    function.argtypes = (ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint)
    function.restype = ctypes.c_int
    return function


_SYNC_FILE_RANGE = _sync_file_range()
_SYNC_FILE_RANGE_WRITE = 2  # start writing the dirty pages out; do not wait


def start_writeback(file: IO[bytes], offset: int) -> None:
    """Start writing what ``file`` holds from ``offset`` to where it stands to
    the disk, without waiting (Linux's ``sync_file_range``; elsewhere
    nothing): a writer that will fsync at the end calls it as each tensor is
    written, so the disk writes one tensor while the next is copied, and the
    fsync waits only for the last. Durability still rests on the fsync."""
    file.flush()
    nbytes = file.tell() - offset
    if _SYNC_FILE_RANGE is not None and nbytes > 0:
        _SYNC_FILE_RANGE(file.fileno(), offset, nbytes, _SYNC_FILE_RANGE_WRITE)  # a failure only leaves it to the fsync


@contextlib.contextmanager
def atomic_destination(dst: Path, *, force: bool, directory: bool, fn: str, sync: bool) -> Iterator[Path]:
    """Yield a temporary path to write; on success rename it to ``dst``,
    flushed to the disk first with ``sync`` (see :func:`commit`).

    Raises:
        DestinationExistsError: ``dst`` exists and ``force`` is false (checked
            before anything is written, and again at the end).
        DestinationError: ``dst``'s directory cannot be created or written.
    """
    check_destination(dst, force=force, fn=fn)
    created = _missing_parents(dst.parent)
    tmp = temporary_name(dst)
    try:
        try:
            dst.parent.mkdir(parents=True, exist_ok=True)
            remove_stale_temporaries(dst)
            if directory:
                tmp.mkdir()
            else:
                tmp.touch(exist_ok=False)
        except OSError as err:
            raise _unwritable(dst, err, fn) from None
        yield tmp
        commit(tmp, dst, force=force, fn=fn, sync=sync)
    except BaseException:
        remove(tmp)
        for parent in created:
            with contextlib.suppress(OSError):
                parent.rmdir()
        raise


def _unwritable(dst: Path, err: OSError, fn: str) -> DestinationError:
    where = f" ({err.filename})" if err.filename else ""
    return DestinationError(
        f"{fn}: cannot write {str(dst)!r}: {err.strerror or err}{where}. Choose a destination "
        "in a directory you can write to. Nothing was written."
    )
