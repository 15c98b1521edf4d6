"""Unpickle checkpoint data without running code from the file.

Checkpoints come from strangers, and unpickling can call any function the
pickle names. ``torch.save`` data is read with torch's weights-only unpickler
(what ``torch.load(weights_only=True)`` runs); a DCP ``.metadata`` file
(which torch reads with plain ``pickle.load``) is read with an unpickler that
imports only the classes DCP metadata is made of. ``trust_pickle=True`` lifts
both restrictions, for files from a trusted source.
"""

from __future__ import annotations

import io
import pickle
import re
from typing import IO, Any, Callable, Optional, Union, cast

import torch
import torch._utils
from torch import _weights_only_unpickler
from torch.serialization import StorageType

from sdtree.errors import CheckpointError, CorruptCheckpointError, UnsafeCheckpointError

__all__ = ["TRUST_HINT", "LOAD_ERRORS", "torch_load", "unpickle_torch_data", "load_error", "load_dcp_metadata"]

TRUST_HINT = (
    "Pass trust_pickle=True (--trust-pickle on the command line) only if you trust "
    "where the checkpoint came from: unpickling it can run any code."
)

_REFUSED = "Weights only load failed"
_GLOBAL = re.compile(r"GLOBAL ([\w.]+)")


def torch_load(
    source: Union[str, IO[bytes], io.IOBase],
    *,
    what: str,
    trust_pickle: bool,
    map_location: Optional[str] = "cpu",
) -> Any:
    """``torch.load`` with ``weights_only=not trust_pickle``, its failures
    turned into sdtree errors that name ``what`` was being read.

    Raises:
        UnsafeCheckpointError: the pickle imports something ``weights_only`` refuses.
        CorruptCheckpointError: the data cannot be read at all.
    """
    try:
        return torch.load(cast(IO[bytes], source), map_location=map_location, weights_only=not trust_pickle)
    except LOAD_ERRORS as err:
        raise load_error(err, what) from None


LOAD_ERRORS = (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, OSError)


class _TrustingUnpickler(pickle.Unpickler):
    """Unpickle anything, resolving names as ``torch.load`` does (storage
    classes by dtype, the old home of ``torch.tensor``)."""

    def find_class(self, module: str, name: str) -> Any:
        if "Storage" in name:
            try:
                return StorageType(name)  # type: ignore[no-untyped-call]  # untyped in torch
            except KeyError:
                pass
        return super().find_class("torch._tensor" if module == "torch.tensor" else module, name)


def unpickle_torch_data(
    data: bytes, persistent_load: Callable[[Any], Any], *, what: str, trust_pickle: bool
) -> Any:
    """Unpickle the ``data.pkl`` of a ``torch.save`` archive as ``torch.load``
    does, its storages resolved by ``persistent_load``; with torch's
    weights-only unpickler unless ``trust_pickle``.

    Raises:
        UnsafeCheckpointError: the pickle imports something ``weights_only`` refuses.
        CorruptCheckpointError: the data cannot be unpickled.
    """
    file = io.BytesIO(data)
    unpickler: Any = _TrustingUnpickler(file, encoding="utf-8") if trust_pickle else _weights_only_unpickler.Unpickler(file, encoding="utf-8")
    unpickler.persistent_load = persistent_load
    try:
        return unpickler.load()
    except CheckpointError:
        raise
    except pickle.UnpicklingError as err:
        raise load_error(err, what) from None
    except Exception as err:  # a garbled pickle raises almost anything
        raise CorruptCheckpointError(f"{what} is corrupt: its pickle could not be read ({type(err).__name__}: {err}).") from None
    finally:
        # sparse tensors queued for torch.load's check; these are placeholders
        torch._utils._sparse_tensors_to_validate.clear()


def load_error(err: BaseException, what: str) -> Exception:
    """The sdtree error for a failure of ``torch.load`` while reading ``what``."""
    if isinstance(err, CheckpointError):
        return err
    text = str(err)
    if isinstance(err, pickle.UnpicklingError) and (_REFUSED in text or _GLOBAL.search(text)):
        found = _GLOBAL.search(text)
        if found is not None:
            return UnsafeCheckpointError(
                f"{what} was refused: its pickle imports {found.group(1)!r}, which "
                f"torch.load(weights_only=True) does not allow. {TRUST_HINT}"
            )
        return CorruptCheckpointError(f"{what} is corrupt: {_reason(text)}")
    return CorruptCheckpointError(f"{what} is corrupt or truncated: {_first_line(text)}")


def _first_line(text: str) -> str:
    return text.strip().splitlines()[0] if text.strip() else "no details"


def _reason(text: str) -> str:
    for line in text.splitlines():
        if "error:" in line:
            return line.strip()
    return _first_line(text)


# -- DCP metadata ---------------------------------------------------------------

_DCP_CLASSES = {
    "torch.distributed.checkpoint.metadata": {
        "Metadata",
        "TensorStorageMetadata",
        "BytesStorageMetadata",
        "ChunkStorageMetadata",
        "TensorProperties",
        "MetadataIndex",
        "StorageMeta",
        "_MEM_FORMAT_ENCODING",
    },
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.serialization": {"_get_layout"},
    "pathlib": {"Path", "PosixPath", "WindowsPath", "PurePath", "PurePosixPath", "PureWindowsPath"},
    "collections": {"OrderedDict"},
    "builtins": {"set", "frozenset"},
}


class _MetadataUnpickler(pickle.Unpickler):
    """Import only what DCP metadata is made of: its dataclasses, ``torch.Size``,
    dtypes, layouts and memory formats, and paths."""

    def __init__(self, file: IO[bytes], what: str) -> None:
        super().__init__(file)
        self._what = what

    def find_class(self, module: str, name: str) -> Any:
        if name in _DCP_CLASSES.get(module, ()):
            return super().find_class(module, name)
        if module == "torch":
            value = getattr(torch, name, None)
            if value is torch.Size or isinstance(value, (torch.dtype, torch.layout, torch.memory_format)):
                return value
        raise UnsafeCheckpointError(
            f"{self._what} was refused: it imports {module}.{name}, which DCP metadata never "
            f"holds, so reading it could run code. {TRUST_HINT}"
        )


def load_dcp_metadata(file: IO[bytes], *, what: str, trust_pickle: bool) -> Any:
    """Unpickle a DCP ``.metadata`` file (restricted unless ``trust_pickle``).

    Raises:
        UnsafeCheckpointError: the file imports something DCP metadata never holds.
        CorruptCheckpointError: the file is not a pickle.
    """
    try:
        if trust_pickle:
            return pickle.load(file)
        return _MetadataUnpickler(file, what).load()
    except UnsafeCheckpointError:
        raise
    except Exception as err:  # a garbled pickle raises almost anything
        raise CorruptCheckpointError(
            f"{what} is corrupt: it could not be unpickled ({type(err).__name__}: {err})."
        ) from None
