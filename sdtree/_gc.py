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
import weakref
from collections.abc import Callable
from typing import Any, TypeVar

__all__ = ["paused_gc", "pauses_gc"]

T = TypeVar("T")


def paused_gc(fn: Callable[..., T]) -> Callable[..., T]:
    """``fn``, run with the cyclic collector paused; it is resumed after,
    even if ``fn`` raises, unless it was paused already (by the caller, or
    by an outer call of the same kind). ``fn`` itself comes back as is when
    it pauses already (:func:`pauses_gc`)."""
    if pauses_gc(fn):
        return fn

    @functools.wraps(fn)
    def paused(*args: Any, **kwargs: Any) -> T:
        if not gc.isenabled():
            return fn(*args, **kwargs)
        gc.disable()
        try:
            return fn(*args, **kwargs)
        finally:
            gc.enable()

    _made.add(paused)
    return paused


def pauses_gc(fn: Any) -> bool:
    """Whether ``fn`` was made by :func:`paused_gc` (kept by identity: an
    attribute would be copied by ``functools.wraps`` onto other wrappers)."""
    try:
        return fn in _made
    except TypeError:  # not weakly referable: not one of ours
        return False


_made: weakref.WeakSet[Callable[..., Any]] = weakref.WeakSet()
