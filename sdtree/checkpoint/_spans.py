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
import functools
import os
import threading
import zlib
from collections.abc import Sequence
from typing import IO, Any, Callable, NamedTuple, Optional, Union

import torch

from sdtree.checkpoint._mapped import FileIdentity, check_still_there
from sdtree.errors import CorruptCheckpointError
from sdtree.transforms.ops import CatOp
from sdtree.transforms.plans import Derivation, derivation_of

__all__ = ["FileSpan", "Piece", "SpanningFetch", "pieces_of", "write_pieces", "concatenates_bytes", "copy_span", "write_summed"]

_BUFFER = 1 << 22  # 4 MiB: what the CRC thread reads at a time (stays in the cache while it is summed)
_BESIDE = 1 << 20  # from this size a CRC is summed in a thread beside the copy; below, a thread costs more than it saves
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


Piece = Union[FileSpan, Callable[[], torch.Tensor]]  # bytes in a file, or a tensor to compute


class SpanningFetch:
    """A fetch (leaf -> tensor) that also gives, for a leaf whose bytes can
    be written piece by piece, those pieces (:func:`pieces_of`): the span of
    a tensor stored plainly in a file, and for a concatenation along dim 0
    (a fuse: its bytes are its parts' bytes, one after another) the pieces
    of each part, a part that has none computed on its own. A writer copies
    spans and writes computed parts as they come, and fetches only what has
    no pieces; so a fuse of stored tensors is copied by the kernel and never
    held whole. ``span(leaf)`` names a stored leaf's span (leaves with no
    derivation only); ``report(nbytes)`` is called for the spans given out
    (the fetch reports what it fetches)."""

    def __init__(
        self,
        fetch: Callable[[torch.Tensor], torch.Tensor],
        span: Callable[[torch.Tensor], Optional[FileSpan]],
        report: Optional[Callable[[int], None]] = None,
    ) -> None:
        self._fetch, self._span, self._report = fetch, span, report

    def __call__(self, leaf: torch.Tensor) -> torch.Tensor:
        return self._fetch(leaf)

    def pieces(self, leaf: torch.Tensor) -> Optional[list[Piece]]:
        found: list[Piece] = []
        if not self._collect(leaf, found):
            return None
        if self._report is not None:
            for piece in found:
                if isinstance(piece, FileSpan):
                    self._report(piece.nbytes)
        return found

    def _collect(self, leaf: Any, found: list[Piece]) -> bool:
        """Append the pieces of ``leaf`` to ``found``; False (appending
        nothing) where it has none: it must be fetched whole."""
        derived = derivation_of(leaf)
        if derived is None:
            span = self._span(leaf) if isinstance(leaf, torch.Tensor) else None
            if span is not None:
                found.append(span)
            return span is not None
        derivation = derived[0]
        if not concatenates_bytes(derivation):
            return False
        for part in derivation.sources:
            if not self._collect(part, found):
                found.append(functools.partial(self._fetch, part))  # type: ignore[arg-type]  # a pending part: the Materializer computes it
        return True


def concatenates_bytes(derivation: Derivation) -> bool:
    """Whether the one output of ``derivation`` is its sources' bytes, one
    after another: a concatenation along dim 0 (of one dtype)."""
    if not isinstance(derivation.op, CatOp) or len(derivation.outputs) != 1:
        return False
    shape = derivation.outputs[0][0]
    return len(shape) > 0 and derivation.op.dim % len(shape) == 0


def pieces_of(fetch: Any, leaf: Any) -> Optional[list[Piece]]:
    """The pieces of ``leaf``'s bytes (see :class:`SpanningFetch`), if
    ``fetch`` gives pieces and it has some."""
    return fetch.pieces(leaf) if isinstance(fetch, SpanningFetch) and isinstance(leaf, torch.Tensor) else None


def write_pieces(out: IO[bytes], pieces: Sequence[Piece], leaf: torch.Tensor, *, crc: bool, what: str) -> Optional[int]:
    """Write ``pieces``, the bytes of the tensor ``leaf`` stands for, to
    ``out`` one after another; return their CRC-32 if ``crc``.

    Raises:
        CorruptCheckpointError: a span's bytes fail their CRC, or the pieces
            do not make up ``leaf``'s bytes (a part computed to another
            dtype or size).
    """
    total, summed = 0, 0
    for piece in pieces:
        if isinstance(piece, FileSpan):
            found = copy_span(piece, out, crc=crc, start=summed)
            total += piece.nbytes
        else:
            part = piece()
            if part.dtype != leaf.dtype or part.device.type != "cpu":
                raise CorruptCheckpointError(
                    f"{what}: a part of it came out {part.dtype} on {part.device}, not {leaf.dtype} on the CPU."
                )
            part = part.detach().contiguous()
            found = write_summed(out, part, start=summed if crc else None)
            total += part.numel() * part.element_size()
            del part  # before the next is computed
        summed = found if found is not None else 0
    if total != leaf.numel() * leaf.element_size():
        raise CorruptCheckpointError(
            f"{what}: its parts hold {total} bytes, but {tuple(leaf.shape)} {leaf.dtype} is "
            f"{leaf.numel() * leaf.element_size()}. The source checkpoint is inconsistent."
        )
    return summed if crc else None


def copy_span(span: FileSpan, out: IO[bytes], *, crc: bool, start: int = 0) -> Optional[int]:
    """Append the bytes of ``span`` to the file ``out`` (at its position,
    which ends after them); return their CRC-32 if ``crc`` (else None),
    continued from ``start`` (the CRC of what came before them).

    Raises:
        CorruptCheckpointError: the source file has changed since it was
            opened, is too short, or the bytes fail the CRC it records.
    """
    out.flush()
    at = out.tell()
    with open(span.path, "rb", buffering=0) as source:
        check_still_there(source.fileno(), span.path, span.offset, span.nbytes, span.what, span.identity)
        summer = _Summer(source.fileno(), span, start if crc else None) if crc or span.crc is not None else None
        try:
            _copy_range(source.fileno(), out.fileno(), span, at)
        finally:
            own, continued = summer.result() if summer is not None else (None, None)
    out.seek(at + span.nbytes)
    if span.crc is not None and own != span.crc:
        raise CorruptCheckpointError(
            f"{span.what} is corrupt: its record at bytes [{span.offset}, {span.offset + span.nbytes}) of "
            f"{span.path!r} fails its CRC check."
        )
    return continued if crc else None


def _copy_range(source: int, out: int, span: FileSpan, at: int) -> None:
    """Copy the span to ``out`` at offset ``at``: in the kernel where it can,
    else through a buffer."""
    done = 0
    while done < span.nbytes:
        if _COPY_FILE_RANGE is None:  # not Linux
            return _copy_through_buffer(source, out, span, at, done)
        try:
            n = _COPY_FILE_RANGE(source, out, span.nbytes - done, span.offset + done, at + done)
        except OSError as err:
            if err.errno not in _NO_COPY_RANGE:
                raise
            return _copy_through_buffer(source, out, span, at, done)
        if n == 0:
            raise CorruptCheckpointError(f"{span.what}: the file {span.path!r} ended before its bytes did (truncated?).")
        done += n
    return None


_COPY_FILE_RANGE = getattr(os, "copy_file_range", None)  # Linux only


def _pread_into(fd: int, view: memoryview, offset: int) -> int:
    """Read into ``view`` from ``offset`` of ``fd``; the bytes read (``os.preadv``
    where the system has it, which reads into the buffer itself)."""
    if hasattr(os, "preadv"):
        return os.preadv(fd, [view], offset)
    data = os.pread(fd, len(view), offset)
    view[: len(data)] = data
    return len(data)


def _copy_through_buffer(source: int, out: int, span: FileSpan, at: int, done: int) -> None:
    buffer = memoryview(bytearray(_BUFFER))
    while done < span.nbytes:
        n = _pread_into(source, buffer[: min(_BUFFER, span.nbytes - done)], span.offset + done)
        if n == 0:
            raise CorruptCheckpointError(f"{span.what}: the file {span.path!r} ended before its bytes did (truncated?).")
        written = 0
        while written < n:
            written += os.pwrite(out, buffer[written:n], at + done + written)
        done += n


class _Summer:
    """The CRC-32 of a span from 0 (what its source records), and continued
    from ``start`` if given (for the file it is copied into), computed in a
    thread of its own while the caller copies it (from 1 MiB; a smaller span
    is summed after the copy, when its result is asked for)."""

    def __init__(self, fd: int, span: FileSpan, start: Optional[int]) -> None:
        self._fd, self._span, self._start = fd, span, start
        self._crcs: Optional[tuple[int, Optional[int]]] = None
        self._error: Optional[BaseException] = None
        self._thread: Optional[threading.Thread] = None
        if span.nbytes < _BESIDE:
            return  # summed in result(), after the copy
        self._thread = threading.Thread(target=self._run, name="sdtree-crc", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            buffer = memoryview(bytearray(min(_BUFFER, self._span.nbytes) or 1))
            own, done, nbytes = 0, 0, self._span.nbytes
            continued = self._start or None  # continued from 0 is ``own``: summed once
            while done < nbytes:
                n = _pread_into(self._fd, buffer[: min(len(buffer), nbytes - done)], self._span.offset + done)
                if n == 0:
                    raise CorruptCheckpointError(
                        f"{self._span.what}: the file {self._span.path!r} ended before its bytes did (truncated?)."
                    )
                own = zlib.crc32(buffer[:n], own)
                if continued is not None:
                    continued = zlib.crc32(buffer[:n], continued)
                done += n
            self._crcs = own, (own if self._start == 0 else continued)
        except BaseException as err:  # re-raised in the caller's thread
            self._error = err

    def result(self) -> tuple[int, Optional[int]]:
        """``(the CRC from 0, the CRC continued from start, or None)``."""
        if self._thread is None:
            self._run()
        else:
            self._thread.join()
        if self._error is not None:
            raise self._error
        assert self._crcs is not None
        return self._crcs


def write_summed(out: IO[bytes], tensor: torch.Tensor, *, start: Optional[int] = 0) -> Optional[int]:
    """Write the bytes of the contiguous CPU ``tensor`` to ``out``; return
    their CRC-32 continued from ``start``, summed in a second thread while
    they are written (None, and no sum, if ``start`` is None)."""
    nbytes = tensor.numel() * tensor.element_size()
    if nbytes == 0:
        return start
    view = memoryview((ctypes.c_ubyte * nbytes).from_address(tensor.data_ptr())).cast("B")
    if start is None:
        out.write(view)
        return None
    if nbytes < _BESIDE:
        out.write(view)
        return zlib.crc32(view, start)
    found: list[int] = []
    summer = threading.Thread(target=lambda: found.append(zlib.crc32(view, start)), name="sdtree-crc", daemon=True)
    summer.start()
    try:
        out.write(view)
    finally:
        summer.join()
    return found[0]
