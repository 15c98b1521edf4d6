"""File spans: a stored tensor written out by the kernel, not through memory.

A conversion that writes a tensor exactly as its source stores it (a key
renamed, a format changed) need not bring its bytes into the process at
all. Where the source stores a tensor plainly (a safetensors file or Hugging
Face shard; a DCP record of one whole chunk), :meth:`Checkpoint.span` names
the bytes, a :class:`FileSpan`, and the writer copies them into its output
with ``copy_file_range``: page cache to page cache, inside the kernel, at
the speed of ``shutil.copyfile``. Mapping the bytes instead (see
``_mapped``) costs a page fault per page, about a second a gigabyte here.

What must read the bytes, reads them beside the copy: the CRC a DCP record
is checked against, or the CRC a DCP output records, is computed in a
second thread through one small buffer (``zlib.crc32`` and ``os.preadv``
release the GIL), so the check costs no wall time where a core is free.
"""

from __future__ import annotations

import ctypes
import errno
import os
import threading
import zlib
from typing import IO, Any, Callable, NamedTuple, Optional

import torch

from sdtree.checkpoint._mapped import FileIdentity, identity_of
from sdtree.errors import CorruptCheckpointError

__all__ = ["FileSpan", "SpanningFetch", "span_of", "copy_span", "write_summed"]

_BUFFER = 1 << 22  # 4 MiB: what the CRC thread reads at a time (stays in the cache while it is summed)
_NO_COPY_RANGE = {errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL, errno.EBADF}


class FileSpan(NamedTuple):
    """The bytes of one stored tensor: ``nbytes`` at ``offset`` of ``path``,
    in the tensor's own layout (contiguous, this machine's byte order).

    ``crc``: the CRC-32 the source records for them (checked as they are
    copied), or None; ``identity``: what the file was when the checkpoint
    was opened (a file that has changed since is refused), or None;
    ``what``: the tensor, for errors."""

    path: str
    offset: int
    nbytes: int
    crc: Optional[int]
    identity: Optional[FileIdentity]
    what: str


class SpanningFetch:
    """A fetch (leaf -> tensor) that also names, for a leaf stored plainly in
    a file, the span of its bytes: a writer asks :func:`span_of` first and
    copies the span, and fetches only what has none. ``report(nbytes)`` is
    called for each span given out (the fetch reports its own)."""

    def __init__(
        self,
        fetch: Callable[[torch.Tensor], torch.Tensor],
        span: Callable[[torch.Tensor], Optional[FileSpan]],
        report: Optional[Callable[[int], None]] = None,
    ) -> None:
        self._fetch, self._span, self._report = fetch, span, report

    def __call__(self, leaf: torch.Tensor) -> torch.Tensor:
        return self._fetch(leaf)

    def span(self, leaf: torch.Tensor) -> Optional[FileSpan]:
        found = self._span(leaf)
        if found is not None and self._report is not None:
            self._report(found.nbytes)
        return found


def span_of(fetch: Any, leaf: Any) -> Optional[FileSpan]:
    """The span of ``leaf``'s bytes, if ``fetch`` names spans and it has one."""
    return fetch.span(leaf) if isinstance(fetch, SpanningFetch) and isinstance(leaf, torch.Tensor) else None


def copy_span(span: FileSpan, out: IO[bytes], *, crc: bool) -> Optional[int]:
    """Append the bytes of ``span`` to the file ``out`` (at its position,
    which ends after them); return their CRC-32 if ``crc`` (else None).

    Raises:
        CorruptCheckpointError: the source file has changed since it was
            opened, is too short, or the bytes fail the CRC it records.
    """
    out.flush()
    start = out.tell()
    with open(span.path, "rb", buffering=0) as source:
        stat = os.fstat(source.fileno())
        if span.identity is not None and identity_of(stat) != span.identity:
            raise CorruptCheckpointError(f"{span.what}: the file {span.path!r} has changed since the checkpoint was opened. Open it again.")
        if span.offset + span.nbytes > stat.st_size:
            raise CorruptCheckpointError(
                f"{span.what}: the file {span.path!r} is {stat.st_size} bytes, too short for bytes "
                f"[{span.offset}, {span.offset + span.nbytes}) (truncated since it was opened?)."
            )
        summer = _Summer(source.fileno(), span) if crc or span.crc is not None else None
        try:
            _copy_range(source.fileno(), out.fileno(), span, start)
        finally:
            found = summer.result() if summer is not None else None
    out.seek(start + span.nbytes)
    if span.crc is not None and found != span.crc:
        raise CorruptCheckpointError(
            f"{span.what} is corrupt: its record at bytes [{span.offset}, {span.offset + span.nbytes}) of "
            f"{span.path!r} fails its CRC check."
        )
    return found if crc else None


def _copy_range(source: int, out: int, span: FileSpan, at: int) -> None:
    """Copy the span to ``out`` at offset ``at``: in the kernel where it can,
    else through a buffer."""
    done = 0
    while done < span.nbytes:
        try:
            n = os.copy_file_range(source, out, span.nbytes - done, span.offset + done, at + done)
        except OSError as err:
            if err.errno not in _NO_COPY_RANGE:
                raise
            return _copy_through_buffer(source, out, span, at, done)
        if n == 0:
            raise CorruptCheckpointError(f"{span.what}: the file {span.path!r} ended before its bytes did (truncated?).")
        done += n
    return None


def _copy_through_buffer(source: int, out: int, span: FileSpan, at: int, done: int) -> None:
    buffer = memoryview(bytearray(_BUFFER))
    while done < span.nbytes:
        n = os.preadv(source, [buffer[: min(_BUFFER, span.nbytes - done)]], span.offset + done)
        if n == 0:
            raise CorruptCheckpointError(f"{span.what}: the file {span.path!r} ended before its bytes did (truncated?).")
        written = 0
        while written < n:
            written += os.pwrite(out, buffer[written:n], at + done + written)
        done += n


class _Summer:
    """The CRC-32 of a span, computed in a thread of its own while the caller copies it."""

    def __init__(self, fd: int, span: FileSpan) -> None:
        self._fd, self._span = fd, span
        self._crc: Optional[int] = None
        self._error: Optional[BaseException] = None
        self._thread = threading.Thread(target=self._run, name="sdtree-crc", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            buffer = memoryview(bytearray(min(_BUFFER, self._span.nbytes) or 1))
            crc, done, nbytes = 0, 0, self._span.nbytes
            while done < nbytes:
                n = os.preadv(self._fd, [buffer[: min(len(buffer), nbytes - done)]], self._span.offset + done)
                if n == 0:
                    raise CorruptCheckpointError(
                        f"{self._span.what}: the file {self._span.path!r} ended before its bytes did (truncated?)."
                    )
                crc = zlib.crc32(buffer[:n], crc)
                done += n
            self._crc = crc
        except BaseException as err:  # re-raised in the caller's thread
            self._error = err

    def result(self) -> int:
        self._thread.join()
        if self._error is not None:
            raise self._error
        assert self._crc is not None
        return self._crc


def write_summed(out: IO[bytes], tensor: torch.Tensor) -> int:
    """Write the bytes of the contiguous CPU ``tensor`` to ``out``; return
    their CRC-32, summed in a second thread while they are written."""
    nbytes = tensor.numel() * tensor.element_size()
    if nbytes == 0:
        return 0
    view = memoryview((ctypes.c_ubyte * nbytes).from_address(tensor.data_ptr())).cast("B")
    found: list[int] = []
    summer = threading.Thread(target=lambda: found.append(zlib.crc32(view)), name="sdtree-crc", daemon=True)
    summer.start()
    try:
        out.write(view)
    finally:
        summer.join()
    return found[0]
