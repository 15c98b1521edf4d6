"""``torch.save`` files: open lazily, write one tensor at a time.

Reading: ``torch.load(map_location="meta", weights_only=True)`` unpickles the
structure without reading any tensor data and tells where each storage lies
in the zip archive; a tensor is then read from that byte range on demand.
Legacy (pre-zip) files have no such index and are read whole.

Writing: the structure is pickled first, each tensor as a reference to a
storage record, the way ``torch.save`` pickles it; then each tensor is
fetched and written as its own record through torch's zip writer, and
dropped. The file loads with plain ``torch.load(weights_only=True)``.
Tensors are stored compactly (a view stores only its own elements), and one
stored tensor serves every key that holds the same view of the same memory,
so tied parameters load back as one tensor object.
"""

from __future__ import annotations

import collections
import functools
import io
import pickle
import sys
import zipfile
from collections.abc import Hashable
from pathlib import Path
from typing import IO, Any, Callable, Optional, Union

import attrs
import torch
from torch.utils.serialization import config as serialization_config

from sdtree._tree import tree_flatten, tree_flatten_with_path, tree_unflatten
from sdtree.checkpoint._lazy import (
    Checkpoint,
    Fetch,
    fetched_plain,
    first_aliases,
    dotted,
    read_range,
    tensor_from_bytes,
)
from sdtree.checkpoint._pickle import torch_load
from sdtree.errors import UnsupportedLeafError
from sdtree.transforms.tensors import contiguous_strides

__all__ = ["open_torch_file", "write_torch_file", "byteorder"]

# Leaves that cannot hide a tensor inside them; any other leaf type means the
# file is read whole, so no tensor is left as a placeholder in an opaque object.
_PLAIN_LEAVES = (int, float, complex, str, bytes, bool, type(None), torch.Size, torch.dtype, torch.device)


# -- reading ------------------------------------------------------------------


def open_torch_file(path: Path, *, trust_pickle: bool) -> Checkpoint:
    """Open a ``torch.save`` file: its structure now, each tensor on demand."""
    what = f"torch.save file {str(path)!r}"
    if not zipfile.is_zipfile(path):
        return Checkpoint(path, "torch", torch_load(str(path), what=what, trust_pickle=trust_pickle), readers={})
    tree = torch_load(str(path), what=what, trust_pickle=trust_pickle, map_location="meta")
    leaves, spec = tree_flatten(tree)
    if not all(_lazy_ok(leaf) for leaf in leaves):
        return Checkpoint(path, "torch", torch_load(str(path), what=what, trust_pickle=trust_pickle), readers={})
    swap = byteorder(path) not in (None, sys.byteorder)
    readers: dict[int, Callable[[], torch.Tensor]] = {}
    seen: dict[Hashable, torch.Tensor] = {}
    for i, leaf in enumerate(leaves):
        if not isinstance(leaf, torch.Tensor) or id(leaf) in readers:
            continue
        offset = int(leaf.untyped_storage()._checkpoint_offset or 0)
        place = (offset, leaf.storage_offset(), tuple(leaf.shape), leaf.stride(), leaf.dtype)
        if place in seen:  # another view of the same bytes: a tied tensor
            leaves[i] = seen[place]
            continue
        seen[place] = leaf
        readers[id(leaf)] = functools.partial(_read_tensor, path, leaf, offset, swap, what)
    return Checkpoint(path, "torch", tree_unflatten(spec, leaves), readers=readers)


def _lazy_ok(leaf: Any) -> bool:
    if isinstance(leaf, torch.Tensor):
        return (
            (type(leaf) is torch.Tensor or isinstance(leaf, torch.nn.Parameter))
            and leaf.is_meta
            and leaf.layout == torch.strided
            and getattr(leaf.untyped_storage(), "_checkpoint_offset", None) is not None
        )
    return isinstance(leaf, _PLAIN_LEAVES)


def byteorder(source: Union[Path, IO[bytes], io.IOBase]) -> Optional[str]:
    """The byte order a ``torch.save`` zip archive records (``None``: not recorded)."""
    with zipfile.ZipFile(source) as archive:
        for name in archive.namelist():
            if name.endswith("/byteorder"):
                return archive.read(name).decode()
    return None


def _read_tensor(path: Path, meta: torch.Tensor, offset: int, swap: bool, what: str) -> torch.Tensor:
    """Read the bytes ``meta`` spans in its storage and build the tensor."""
    shape, stride, itemsize = tuple(meta.shape), meta.stride(), meta.element_size()
    extent = 1 + sum((n - 1) * s for n, s in zip(shape, stride)) if meta.numel() else 0
    start = offset + int(meta.storage_offset()) * itemsize
    buffer = read_range(path, start, extent * itemsize, what=what)
    if swap:
        buffer.untyped_storage().byteswap(meta.dtype)  # type: ignore[no-untyped-call]
    return tensor_from_bytes(buffer, meta.dtype, shape, stride)


# -- writing ------------------------------------------------------------------


@attrs.frozen(eq=False)
class _Slot:
    """One stored tensor: the storage record ``key`` and the leaf to fetch."""

    key: str
    leaf: torch.Tensor
    where: str  # the first flat key that holds it, for errors


class _StorageRef:
    """Pickled as a persistent id: a reference to the record of ``slot``."""

    def __init__(self, slot: _Slot) -> None:
        self.slot = slot


class _SkeletonPickler(pickle.Pickler):
    """Pickle a tree whose tensors are :class:`_Slot` objects the way
    ``torch.save`` pickles tensors: ``_rebuild_tensor_v3`` over a storage
    record named by a persistent id."""

    def reducer_override(self, obj: Any) -> Any:
        if type(obj) is not _Slot:
            return NotImplemented
        leaf = obj.leaf
        shape = tuple(leaf.shape)
        hooks: collections.OrderedDict[Any, Any] = collections.OrderedDict()
        args = (_StorageRef(obj), 0, shape, contiguous_strides(shape), False, hooks, leaf.dtype)
        return (torch._utils._rebuild_tensor_v3, args)

    def persistent_id(self, obj: Any) -> Any:
        if type(obj) is _StorageRef:
            leaf = obj.slot.leaf
            return ("storage", torch.UntypedStorage, obj.slot.key, "cpu", leaf.numel() * leaf.element_size())
        if isinstance(obj, (torch.UntypedStorage, torch.storage.TypedStorage)):
            raise UnsupportedLeafError(
                "torch.save writer: the state dict holds a tensor inside an object sdtree cannot "
                f"walk into ({type(obj).__name__}). Keep tensors in dicts, lists and tuples."
            )
        return None


def _slots(tree: Any) -> tuple[Any, list[_Slot]]:
    """Replace each tensor leaf by its slot; one slot per distinct view of memory."""
    paths, leaves, spec = tree_flatten_with_path(tree)
    positions = [i for i, leaf in enumerate(leaves) if isinstance(leaf, torch.Tensor)]
    slots: list[_Slot] = []
    slot_of: list[_Slot] = []
    for n, first in enumerate(first_aliases([leaves[i] for i in positions])):
        if first == n:
            slots.append(_Slot(str(len(slots)), leaves[positions[n]], dotted(paths[positions[n]])))
        slot_of.append(slot_of[first] if first < n else slots[-1])
    for i, slot in zip(positions, slot_of):
        leaves[i] = slot
    return tree_unflatten(spec, leaves), slots


def write_torch_file(path: Path, tree: Any, fetch: Fetch, *, fn: str) -> None:
    """Write ``tree`` as a ``torch.save`` file at ``path``, fetching one tensor at a time."""
    skeleton, slots = _slots(tree)
    data = io.BytesIO()
    _SkeletonPickler(data, protocol=2).dump(skeleton)
    alignment = serialization_config.save.storage_alignment
    # The writer owns its file: if a fetch fails, it finishes the archive
    # whenever it is collected, never into a file closed under it.
    writer = torch._C.PyTorchFileWriter(str(path), torch.serialization.get_crc32_options(), alignment)
    _write_records(writer, data.getvalue(), alignment, slots, fetch, fn)
    del writer


def _write_records(writer: Any, pickled: bytes, alignment: int, slots: list[_Slot], fetch: Fetch, fn: str) -> None:
    """The records of ``torch.save``'s format: the pickle, format markers, then one per storage."""
    for name, record in (
        ("data.pkl", pickled),
        (".format_version", b"1"),
        (".storage_alignment", str(alignment).encode()),
        ("byteorder", sys.byteorder.encode()),
    ):
        writer.write_record(name, record, len(record))
    for slot in slots:
        tensor = fetched_plain(fetch(slot.leaf), slot.leaf, slot.where, fn)
        # torch.save passes the storage itself too (no copy); the stubs miss that overload
        writer.write_record(f"data/{slot.key}", tensor.untyped_storage(), tensor.nbytes)
        del tensor
    writer.write_end_of_file()
