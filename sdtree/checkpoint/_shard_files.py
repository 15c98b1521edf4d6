"""The files a checkpoint directory's index names (DCP ``.metadata``, a
Hugging Face ``*.index.json``): only files inside the directory are read.

A name is checked as written: relative, without ``..``. A symlink the
directory holds is then followed, wherever it points, as Hugging Face's cache
links each shard of a snapshot into its ``blobs`` folder.
"""

from __future__ import annotations

import stat
from pathlib import Path, PurePosixPath, PureWindowsPath

from sdtree.errors import CorruptCheckpointError

__all__ = ["names_inside", "shard_file_size"]


def names_inside(name: str) -> bool:
    """Whether ``name`` names a file inside the directory it is read from:
    relative, without '..'. (A symlink the directory holds is followed.)"""
    parts = PurePosixPath(name).parts
    return bool(parts) and not PurePosixPath(name).is_absolute() and ".." not in parts and "\0" not in name and not PureWindowsPath(name).anchor


def shard_file_size(path: Path, what: str, kind: str = "shard file") -> int:
    """The size of the regular file at ``path``; -1 if there is none.
    ``kind`` names the file in errors.

    Raises:
        CorruptCheckpointError: it is not a regular file (a named pipe would
            block its reader), or it cannot be read.
    """
    try:
        mode = path.stat()
    except FileNotFoundError:
        return -1
    except OSError as err:  # a symlink loop, a file it may not read
        raise CorruptCheckpointError(f"{what}: the {kind} {str(path)!r} cannot be read: {err.strerror or err}.") from None
    if not stat.S_ISREG(mode.st_mode):
        raise CorruptCheckpointError(f"{what}: the {kind} {str(path)!r} is not a regular file.")
    return mode.st_size
