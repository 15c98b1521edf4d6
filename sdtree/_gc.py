"""Pausing Python's cyclic garbage collector while a call builds a state
dict's worth of containers.

A state dict of 100,000 keys makes hundreds of thousands of small objects
(keys, tuples, dicts, tensors) that hold no cycles. Each time enough of them
survive, the collector runs a full collection, which walks every object
alive: the input's tensors included. Planning 100,000 keys on meta tensors
paid four such collections, twice the planning itself. Torch's
``get_state_dict`` pauses the collector for the same reason (``_gc_context``).
"""

from __future__ import annotations

import functools
import gc
from collections.abc import Callable
from typing import Any, TypeVar

__all__ = ["paused_gc"]

T = TypeVar("T")


def paused_gc(fn: Callable[..., T]) -> Callable[..., T]:
    """``fn``, run with the cyclic collector paused; it is resumed after,
    even if ``fn`` raises, unless it was paused already (by the caller, or
    by an outer call of the same kind)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> T:
        if not gc.isenabled():
            return fn(*args, **kwargs)
        gc.disable()
        try:
            return fn(*args, **kwargs)
        finally:
            gc.enable()

    return wrapper
