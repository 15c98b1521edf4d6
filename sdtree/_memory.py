"""Fresh CPU memory that is faulted in by huge pages.

A collective that returns new tensors receives into new memory, and on CPU
the kernel faults new memory in page by page during the transfer: 64 MiB
costs about 14 ms in 4 KiB pages on this machine, against 4 ms once its
pages are written. Where transparent huge pages are on ``madvise`` (the
default of most distributions), advising the memory with
``MADV_HUGEPAGE`` makes the kernel fault it in 2 MiB at a time: about 4 ms
for the same 64 MiB. Memory of 32 MiB and more comes straight from
``mmap`` (glibc's largest threshold) and is faulted anew on every call;
smaller blocks are mostly reused warm from the heap. Torch advises its own
CPU allocations only under ``THP_MEM_ALLOC_ENABLE=1``, read once at start.
"""

from __future__ import annotations

import ctypes
import mmap
import sys
from typing import Optional, Union

import torch

__all__ = ["empty", "HUGE_PAGE"]

HUGE_PAGE = 2 * 1024 * 1024
# advised only from two huge pages up: below, the call costs more than it saves
_ADVISED_BYTES = 2 * HUGE_PAGE


def _madvise() -> Optional[ctypes._CFuncPtr]:  # type: ignore[name-defined]
    """libc's ``madvise``, where advising huge pages can help: Linux, with
    transparent huge pages not off."""
    if not sys.platform.startswith("linux") or not hasattr(mmap, "MADV_HUGEPAGE"):
        return None
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            if "[never]" in f.read():
                return None
        fn = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    fn.restype = ctypes.c_int
    return fn


_advise = _madvise()


def empty(shape: Union[int, tuple[int, ...], torch.Size], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``torch.empty(shape, dtype=dtype, device=device)``; on CPU, from
    ``_ADVISED_BYTES`` up, its whole 2 MiB-aligned pages advised as huge
    pages (a hint: a refusal changes nothing but the speed)."""
    out = torch.empty(shape, dtype=dtype, device=device)
    if _advise is not None and out.device.type == "cpu":
        nbytes = out.numel() * dtype.itemsize
        if nbytes >= _ADVISED_BYTES:
            start = out.data_ptr()
            first = (start + HUGE_PAGE - 1) & -HUGE_PAGE
            end = (start + nbytes) & -HUGE_PAGE
            if end > first:
                _advise(first, end - first, mmap.MADV_HUGEPAGE)
    return out
