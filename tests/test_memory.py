import sys

import pytest
import torch

from sdtree import _memory
from sdtree._memory import HUGE_PAGE, empty


def _vm_flags(address: int) -> list[str]:
    """The VmFlags of the mapping of this process that holds ``address``."""
    flags = None
    inside = False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()[0]
            if "-" in head and not head.endswith(":"):
                lo, hi = (int(x, 16) for x in head.split("-"))
                inside = lo <= address < hi
            elif inside and head == "VmFlags:":
                flags = line.split()[1:]
    assert flags is not None, f"no mapping holds {address:#x}"
    return flags


@pytest.mark.parametrize("shape", [(3, 5), 0, (4 * 1024 * 1024,), (1024, 2049)])
def test_empty_is_torch_empty(shape):
    out = empty(shape, torch.float32, torch.device("cpu"))
    assert out.shape == torch.empty(shape).shape and out.dtype == torch.float32 and out.device.type == "cpu"
    assert out.is_contiguous()
    out.fill_(1.5)  # all of it is usable memory
    assert out.sum().item() == 1.5 * out.numel()


@pytest.mark.skipif(_memory._advise is None, reason="needs Linux with transparent huge pages not off")
def test_large_fresh_memory_is_advised_for_huge_pages():
    big = empty(16 * 1024 * 1024, torch.uint8, torch.device("cpu"))  # 16 MiB: whole huge pages inside
    first = (big.data_ptr() + HUGE_PAGE - 1) & -HUGE_PAGE
    assert "hg" in _vm_flags(first)  # the kernel's flag for MADV_HUGEPAGE


def test_only_whole_huge_pages_inside_large_tensors_are_advised(monkeypatch):
    calls = []
    monkeypatch.setattr(_memory, "_advise", lambda start, length, advice: calls.append((start, length)) or 0)
    empty(1024 * 1024, torch.uint8, torch.device("cpu"))  # below two huge pages: not worth the call
    assert calls == []
    big = empty((3, 1024 * 1024), torch.float32, torch.device("cpu"))  # 12 MiB
    ((start, length),) = calls
    assert start % HUGE_PAGE == 0 and length % HUGE_PAGE == 0 and length >= 10 * 1024 * 1024
    assert big.data_ptr() <= start and start + length <= big.data_ptr() + 12 * 1024 * 1024
    empty((8, 1024 * 1024), torch.float32, torch.device("meta"))  # not CPU memory
    assert len(calls) == 1


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="madvise is Linux's")
def test_without_transparent_huge_pages_empty_still_allocates(monkeypatch):
    monkeypatch.setattr(_memory, "_advise", None)
    out = empty((2048, 2048), torch.float32, torch.device("cpu"))
    assert out.shape == (2048, 2048)
