"""Errors raised by sdtree.

Every error derives from :class:`SdtreeError` and from the built-in exception
that fits it, so ``except ValueError`` keeps working for callers that do not
know sdtree. Messages name the function, the offending keys (first five and a
count), what was expected and what was found, and how to fix it.

The helpers every message is written with live here too: :func:`preview`
renders the offending items, and :func:`api_call` / :func:`api_name` carry
the name of the public function being run down to the code that raises, so
that an error names ``set_state_dict`` when that is what was called.
"""

from __future__ import annotations

import contextlib
import contextvars
import pickle
from collections.abc import Iterable, Iterator
from typing import Any

__all__ = [
    "preview",
    "api_call",
    "api_name",
    "SdtreeError",
    "KeyCollisionError",
    "MissingPrefixError",
    "NonStringKeyError",
    "NotAMappingError",
    "UnsupportedLeafError",
    "LayoutMismatchError",
    "MissingParamIdError",
    "NotInvertibleError",
    "InvalidRuleError",
    "StructureMismatchError",
    "StagingMismatchError",
    "StagerClosedError",
    "PatternMatchError",
    "TensorMismatchError",
    "IncompatibleStateDictError",
    "CheckpointError",
    "CheckpointNotFoundError",
    "CheckpointFormatError",
    "CorruptCheckpointError",
    "UnsafeCheckpointError",
    "DestinationExistsError",
    "NothingToWriteError",
    "NothingToCompareError",
    "InvalidToleranceError",
    "DestinationError",
]


class SdtreeError(Exception):
    """Base class for sdtree errors."""


class KeyCollisionError(SdtreeError, ValueError):
    """Two source keys map to one target key."""


class MissingPrefixError(SdtreeError, ValueError):
    """A key lacks a required prefix."""


class NonStringKeyError(SdtreeError, TypeError):
    """A key is not a string where FQN strings are required."""


class NotAMappingError(SdtreeError, TypeError):
    """A state dict (or part of one) is not a mapping."""


class UnsupportedLeafError(SdtreeError, TypeError, ValueError):
    """A leaf has a type the operation cannot handle.

    Also a ``ValueError`` because torch raises ``ValueError`` in the same place.
    """


class LayoutMismatchError(SdtreeError, ValueError):
    """An optimizer layout does not match the state dict it is applied to."""


class MissingParamIdError(SdtreeError, ValueError):
    """An optimizer state dict refers to a parameter the mapping lacks."""


class NotInvertibleError(SdtreeError, TypeError):
    """``inverse()`` was asked of a transform that has no exact inverse."""


class InvalidRuleError(SdtreeError, ValueError):
    """A transform's rule is malformed (a bad regular expression, a
    replacement that refers to a group its pattern lacks)."""


class StructureMismatchError(SdtreeError, ValueError):
    """Two state dicts that must share a structure do not."""


class StagingMismatchError(StructureMismatchError):
    """A state dict given to a :class:`~sdtree.Stager` differs from the one
    its mirror was built for (keys, shapes, dtypes, sharding, or which
    tensors share storage)."""


class StagerClosedError(SdtreeError, RuntimeError):
    """A :class:`~sdtree.Stager` was asked to stage after ``close()``."""


class PatternMatchError(SdtreeError, ValueError):
    """A rule's key patterns match no key, match one key twice, or leave a
    group of keys incomplete."""


class TensorMismatchError(SdtreeError, ValueError):
    """Tensors (or optimizer entries) do not have the shapes, dtypes or values
    a tensor transform needs."""


def preview(items: Iterable[Any], limit: int = 5, *, quote: bool = True) -> str:
    """Render the first ``limit`` items as ``'a', 'b', ... (N more)``.

    ``quote=False`` shows strings as they are (for paths already rendered).

    >>> preview(["a", "b", "c"], limit=2)
    "'a', 'b', ... (1 more)"
    """
    items = list(items)
    render = repr if quote else str
    shown = ", ".join(render(item) for item in items[:limit])
    if len(items) > limit:
        shown += f", ... ({len(items) - limit} more)"
    return shown


_API_NAME: contextvars.ContextVar[str] = contextvars.ContextVar("sdtree_api_name", default="")


@contextlib.contextmanager
def api_call(name: str) -> Iterator[None]:
    """Run the body as the public function ``name``: errors raised inside
    name it (:func:`api_name`). The outermost call wins, so the functions a
    public function calls on its behalf do not rename it.

    >>> with api_call("set_state_dict"):
    ...     with api_call("set_model_state_dict"):
    ...         api_name()
    'set_state_dict'
    """
    if _API_NAME.get():
        yield
        return
    token = _API_NAME.set(name)
    try:
        yield
    finally:
        _API_NAME.reset(token)


def api_name(default: str = "sdtree") -> str:
    """The public function being run (see :func:`api_call`), else ``default``."""
    return _API_NAME.get() or default


class IncompatibleStateDictError(SdtreeError, RuntimeError):
    """A state dict does not fit the model or optimizer it is loaded into.

    Also a ``RuntimeError``, as torch's ``load_state_dict`` raises; its message
    says "Missing key" / "Unexpected key" where those are the problem.
    """


class CheckpointError(SdtreeError):
    """Base class of the errors of :mod:`sdtree.checkpoint` about files on disk."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """A checkpoint path does not exist."""


class CheckpointFormatError(CheckpointError, ValueError):
    """A path holds no checkpoint format sdtree knows, or a format cannot hold
    what it is asked to (an optimizer in a safetensors file)."""


class CorruptCheckpointError(CheckpointError, ValueError):
    """A checkpoint is truncated, garbled, or lacks a file its index names."""


class UnsafeCheckpointError(CheckpointError, pickle.UnpicklingError):
    """Reading a checkpoint would unpickle objects that can run code.

    Also a ``pickle.UnpicklingError``, as ``torch.load(weights_only=True)`` raises.
    """


class DestinationExistsError(CheckpointError, FileExistsError):
    """A checkpoint would overwrite an existing path without ``force=True``."""


class NothingToWriteError(CheckpointError, ValueError):
    """A conversion would write a checkpoint that holds no tensor: its transform
    or options leave nothing of the source."""


class NothingToCompareError(CheckpointError, ValueError):
    """A diff of two checkpoints that hold no entry at all: nothing was
    compared, so it cannot say that they are equal."""


class InvalidToleranceError(SdtreeError, ValueError):
    """A diff's ``rtol`` or ``atol`` is negative, infinite or NaN: no
    comparison it would make means anything."""


class DestinationError(CheckpointError, OSError):
    """A checkpoint cannot be written where asked: the directory cannot be
    written, or the destination is (or holds) the source being read."""
