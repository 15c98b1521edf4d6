"""The benchmarks' memory measure: this process's resident set size, sampled
every millisecond while a call runs."""

from __future__ import annotations

import os
import threading
import time
from typing import Any, Callable


def rss() -> int:
    """The resident set size of this process, in bytes."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_extra_rss(fn: Callable[[], Any]) -> tuple[Any, int]:
    """``(fn(), the highest RSS sampled during the call minus the RSS before it)``."""
    base = rss()
    peak = [base]
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], rss())
            time.sleep(0.001)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        out = fn()
    finally:
        stop.set()
        sampler.join()
    return out, max(peak[0], rss()) - base
