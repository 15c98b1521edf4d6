"""Borrowed tensors: views of a checkpoint file's bytes, mapped copy-on-write.

A conversion that computes from a tensor as it is stored need not read it
into memory of its own first: :meth:`Checkpoint.borrow` maps the bytes where
they lie in the file (``mmap`` with ``MAP_PRIVATE``) and views them as the
tensor. (One written exactly as stored is not even mapped: see ``_spans``.)
Its pages are the page cache's, not the process's anonymous memory, and a
write into the tensor goes to a private copy of the page, never to the file.
Each borrowed tensor has a mapping of its own, unmapped when the last view of
it is freed, so a conversion maps only what it holds at the moment.

A file truncated while one of its tensors is borrowed makes the next access
to the lost pages fail with ``SIGBUS``, which ends the process. So only
:func:`sdtree.checkpoint.convert`, which writes a borrowed tensor out and
lets it go, borrows; ``Checkpoint.fetch``, whose tensors outlive the call,
copies.
"""

from __future__ import annotations

import contextlib
import ctypes
import mmap
import os
import sys
import zlib
from pathlib import Path
from typing import NamedTuple, Optional

import torch

from sdtree.errors import CorruptCheckpointError

__all__ = ["FileIdentity", "identity_of", "check_still_there", "map_bytes", "crc_of"]

_MADV_POPULATE_READ = 22  # Linux's; Python's mmap module does not name it


class FileIdentity(NamedTuple):
    """What a file was when its checkpoint was opened: a borrow from a file
    that since became another (replaced, rewritten, truncated) is refused."""

    device: int
    inode: int
    size: int
    mtime_ns: int


def identity_of(stat: os.stat_result) -> FileIdentity:
    return FileIdentity(stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns)


def check_still_there(fd: int, path: Path | str, offset: int, nbytes: int, what: str, identity: Optional[FileIdentity]) -> None:
    """Check that the open file ``fd`` is still the one opened as
    ``identity`` (if given) and holds the ``nbytes`` bytes at ``offset``.

    Raises:
        CorruptCheckpointError: it has changed, or is too short.
    """
    stat = os.fstat(fd)
    if identity is not None and identity_of(stat) != identity:
        raise CorruptCheckpointError(f"{what}: the file {str(path)!r} has changed since the checkpoint was opened. Open it again.")
    if offset + nbytes > stat.st_size:
        raise CorruptCheckpointError(
            f"{what}: the file {str(path)!r} is {stat.st_size} bytes, too short for bytes "
            f"[{offset}, {offset + nbytes}) (truncated since it was opened?)."
        )


def map_bytes(path: Path, offset: int, nbytes: int, what: str, *, identity: Optional[FileIdentity] = None) -> torch.Tensor:
    """The ``nbytes`` bytes at ``offset`` of ``path`` as a uint8 tensor over a
    private (copy-on-write) mapping of them, which lasts as long as the tensor.

    Raises:
        CorruptCheckpointError: the file is no longer what was opened
            (``identity``), or is too short to hold the bytes.
    """
    if nbytes == 0:
        return torch.empty(0, dtype=torch.uint8)
    fd = os.open(path, os.O_RDONLY)
    try:
        check_still_there(fd, path, offset, nbytes, what, identity)
        start = offset - offset % mmap.ALLOCATIONGRANULARITY
        mapped = mmap.mmap(
            fd, offset + nbytes - start, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE, offset=start
        )
    finally:
        os.close(fd)  # the mapping keeps what it needs
    if sys.platform == "linux":  # map every page now, in one call: page faults one by one cost more
        with contextlib.suppress(OSError):  # before Linux 5.14, each page is mapped when first read
            mapped.madvise(_MADV_POPULATE_READ)
    # The tensor holds the mapping (through the buffer it exports) and frees it with its storage.
    return torch.frombuffer(mapped, dtype=torch.uint8, count=nbytes, offset=offset - start)


def crc_of(tensor: torch.Tensor) -> int:
    """The CRC-32 (zip's) of a contiguous CPU tensor's bytes."""
    nbytes = tensor.numel() * tensor.element_size()
    if nbytes == 0:
        return 0
    return zlib.crc32((ctypes.c_ubyte * nbytes).from_address(tensor.data_ptr()))
