"""An opened checkpoint: its structure now, its tensors on demand.

Opening a checkpoint reads only its index (DCP ``.metadata``, the pickle of a
``torch.save`` file, a safetensors header). The result is the checkpoint's
state dict in which every tensor is a *placeholder*: a meta tensor with the
stored shape and dtype. Transforms run on that tree as on any state dict; key
transforms share leaves, so each placeholder can still be traced to the
tensor it stands for and read when a writer needs it — one tensor at a time.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from pathlib import Path
from typing import Any, Callable, Optional

import attrs
import torch

from sdtree._tree import tree_flatten_with_path, tree_map
from sdtree.checkpoint._formats import Format
from sdtree.checkpoint._spans import FileSpan
from sdtree.errors import CorruptCheckpointError, UnsupportedLeafError

__all__ = [
    "Checkpoint",
    "ShardInfo",
    "Fetch",
    "as_is",
    "plain_cpu",
    "fetched_plain",
    "alias_key",
    "first_aliases",
    "dotted",
    "tensor_items",
    "not_flat_model",
]

Fetch = Callable[[torch.Tensor], torch.Tensor]


def as_is(tensor: torch.Tensor) -> torch.Tensor:
    """The fetch of a state dict whose tensors are in memory already."""
    return tensor


@attrs.frozen
class ShardInfo:
    """One file of a sharded checkpoint: its name in the checkpoint directory,
    its size in bytes, and how many tensors it stores."""

    name: str
    nbytes: int
    tensors: int


@attrs.frozen(eq=False)
class Checkpoint:
    """A checkpoint opened by :func:`sdtree.checkpoint.open_checkpoint`.

    Attributes:
        path: where it is.
        format: ``"dcp"``, ``"torch"``, ``"safetensors"`` or ``"hf"``.
        tree: its state dict, tensors as meta placeholders (shape and dtype as
            stored; one placeholder object per stored tensor, so tied
            tensors share it). Legacy ``torch.save`` files, which cannot be
            read piecewise, hold real tensors here.
        shards: the shard files of a Hugging Face directory, in order.
    """

    path: Path
    format: Format
    tree: Any
    _readers: Mapping[int, Callable[[], torch.Tensor]] = attrs.field(repr=False, alias="readers")
    shards: tuple[ShardInfo, ...] = ()
    # Readers that map the stored bytes instead of copying them (see borrow),
    # and the placeholders whose borrower always maps (never falls back to a copy).
    _borrowers: Mapping[int, Callable[[], torch.Tensor]] = attrs.field(repr=False, alias="borrowers", factory=dict)
    _mapped: frozenset[int] = attrs.field(repr=False, alias="mapped", factory=frozenset)
    # Where a placeholder's bytes lie in a file as the tensor's own (see span).
    _spans: Mapping[int, Callable[[], Optional[FileSpan]]] = attrs.field(repr=False, alias="spans", factory=dict)

    def is_placeholder(self, leaf: Any) -> bool:
        """Whether ``leaf`` is one of this checkpoint's placeholders."""
        return id(leaf) in self._readers

    def fetch(self, tensor: torch.Tensor) -> torch.Tensor:
        """Read the tensor a placeholder stands for, as a CPU tensor.

        A new tensor each call, except from a safetensors file: there it is a
        view of the file's copy-on-write memory map, the same for each call.
        A tensor that is not a placeholder is returned as it is.
        """
        reader = self._readers.get(id(tensor))
        return tensor if reader is None else reader()

    def borrow(self, tensor: torch.Tensor) -> torch.Tensor:
        """The tensor a placeholder stands for, as :meth:`fetch`, but where the
        file stores it plainly, a view of its bytes mapped copy-on-write
        rather than a copy (see ``sdtree.checkpoint._mapped``): a safetensors
        file's (or Hugging Face shard's) tensors, and a DCP tensor of at
        least 1 MiB stored as one plain chunk (its CRC checked).

        Writing into it changes memory of its own, never the file. Keep it
        only while the file stays as it is: a file truncated meanwhile ends
        the process (SIGBUS) when the lost pages are read.
        """
        borrower = self._borrowers.get(id(tensor))
        return self.fetch(tensor) if borrower is None else borrower()

    def span(self, leaf: Any) -> Optional[FileSpan]:
        """Where the file stores the bytes of the tensor ``leaf`` stands for,
        exactly as the tensor's own (contiguous, this machine's byte order),
        for a writer to copy them without reading them (see
        ``sdtree.checkpoint._spans``); None where it does not, or ``leaf``
        is no placeholder. A span's CRC, if it has one, is the writer's to check."""
        spanner = self._spans.get(id(leaf))
        return None if spanner is None else spanner()

    def is_mapped(self, leaf: Any) -> bool:
        """Whether :meth:`borrow` always gives ``leaf`` as a view of the file
        (no memory of its own), as for a safetensors file; a DCP tensor is
        mapped only where its record, read when it is borrowed, allows."""
        return id(leaf) in self._mapped

    def load(self) -> Any:
        """Read every tensor: the whole state dict, tied tensors still one object."""
        memo: dict[int, torch.Tensor] = {}

        def materialise(leaf: Any) -> Any:
            if not self.is_placeholder(leaf):
                return leaf
            if id(leaf) not in memo:
                memo[id(leaf)] = self.fetch(leaf)
            return memo[id(leaf)]

        return tree_map(materialise, self.tree)


def dotted(path: tuple[Any, ...]) -> str:
    """The flat key of a tree path, as DCP writes it: ``("optim", "state", "w")`` -> ``"optim.state.w"``."""
    return ".".join(map(str, path))


def tensor_items(tree: Any) -> list[tuple[str, torch.Tensor]]:
    """``(flat key, tensor)`` for every tensor leaf of ``tree``, in order."""
    paths, leaves, _ = tree_flatten_with_path(tree)
    return [(dotted(p), leaf) for p, leaf in zip(paths, leaves) if isinstance(leaf, torch.Tensor)]


def not_flat_model(tree: Any) -> Optional[str]:
    """What keeps ``tree`` from being a flat ``{str: tensor}`` model state dict
    (``"it is a list"``, ``"it has the key 3"``, ``"'step' holds a int"``), or
    ``None`` when it is one."""
    if not isinstance(tree, Mapping):
        return f"it is a {type(tree).__name__}"
    for key, value in tree.items():
        if type(key) is not str:
            return f"it has the key {key!r}"
        if not isinstance(value, torch.Tensor):
            return f"{key!r} holds a {type(value).__name__}"
    return None


def plain_cpu(tensor: torch.Tensor, key: str, fn: str) -> torch.Tensor:
    """``tensor`` as a plain, contiguous CPU tensor whose storage is exactly its data.

    Raises:
        UnsupportedLeafError: a tensor subclass (DTensor...), a sparse or
            quantized tensor, or a meta tensor, which hold no plain data here.
    """
    if not (type(tensor) is torch.Tensor or isinstance(tensor, torch.nn.Parameter)):
        raise UnsupportedLeafError(
            f"{fn}: {key!r} is a {type(tensor).__name__}, not a plain tensor. torch.save and "
            "safetensors files hold full tensors: gather it first (sdtree.gather_state_dict, "
            "or get_state_dict with full_state_dict=True), or save as 'dcp'."
        )
    if tensor.is_meta or tensor.layout != torch.strided or tensor.is_quantized:
        kind = "meta" if tensor.is_meta else str(tensor.layout) if tensor.layout != torch.strided else "quantized"
        raise UnsupportedLeafError(
            f"{fn}: {key!r} is a {kind} tensor, which holds no plain data to write. "
            "Materialise it, or drop it first (drop_meta_tensors(), drop_keys(...))."
        )
    tensor = tensor.detach().cpu()
    if not tensor.is_contiguous() or tensor.storage_offset() != 0 or tensor.untyped_storage().nbytes() != tensor.nbytes:
        tensor = tensor.clone(memory_format=torch.contiguous_format)
    return tensor


def fetched_plain(tensor: torch.Tensor, leaf: torch.Tensor, key: str, fn: str) -> torch.Tensor:
    """A fetched ``tensor`` as :func:`plain_cpu`, checked against ``leaf``,
    the index entry it was fetched for.

    Raises:
        CorruptCheckpointError: it read back with another shape or dtype.
    """
    tensor = plain_cpu(tensor, key, fn)
    if tensor.shape != leaf.shape or tensor.dtype != leaf.dtype:
        raise CorruptCheckpointError(
            f"{fn}: {key!r} read back as {tuple(tensor.shape)} {tensor.dtype}, but its index "
            f"says {tuple(leaf.shape)} {leaf.dtype}. The source checkpoint is inconsistent."
        )
    return tensor


def alias_key(tensor: torch.Tensor) -> Hashable:
    """Equal for two tensors that are the same view of the same memory (tied
    parameters), so a file stores them once; otherwise the object identity."""
    if tensor.is_meta or tensor.numel() == 0 or type(tensor) is not torch.Tensor and not isinstance(tensor, torch.nn.Parameter):
        return id(tensor)
    return (
        str(tensor.device),
        tensor.untyped_storage().data_ptr(),
        tensor.storage_offset(),
        tuple(tensor.shape),
        tensor.stride(),
        tensor.dtype,
    )


def first_aliases(tensors: list[torch.Tensor]) -> list[int]:
    """For each tensor, the position of the first one that is the same view
    of the same memory (:func:`alias_key`): its own position unless it is
    tied to an earlier one. A file stores only the firsts."""
    first: dict[Hashable, int] = {}
    return [first.setdefault(alias_key(tensor), i) for i, tensor in enumerate(tensors)]
