"""Broadcast rank 0's state dict to every rank, in two halves.

:func:`announce` broadcasts what rank 0's state dict holds (structure,
keys, non-tensor values, each tensor's shape and dtype) but no tensor data,
as an :class:`Announcement`; a load plans and agrees on its
:meth:`~Announcement.placeholders` (meta tensors), and only then does
:meth:`~Announcement.deliver` move the tensors, in buckets, two in flight
(:func:`sdtree._collectives.broadcast_buckets`). :func:`broadcast_from_rank0`
is the two halves at once.

Collective: call on every rank; the input of ranks other than 0 is ignored.
Inputs are never written: received tensors are new (views of their
bucket), or rank 0's own. Receiving straight into tensors you hold is
:func:`sdtree.state_dict_utils.deliver_into`.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Mapping
from typing import Any, Optional

import attrs
import torch
import torch.distributed as dist

from sdtree._collectives import DEFAULT_BUCKET_BYTES, broadcast_buckets, is_distributed, rank
from sdtree._tree import tree_flatten, tree_unflatten
from sdtree.errors import NotAMappingError
from sdtree.transforms.compose import Transform
from sdtree.transforms.tensors import sharded_tensor_type

__all__ = ["broadcast_from_rank0", "announce", "Announcement", "Path"]

Path = tuple[Any, ...]
Place = Callable[[Path, torch.Tensor], Any]


@attrs.frozen(repr=False)
class _BroadcastFromRank0(Transform):
    _factory = "broadcast_from_rank0"
    bucket_bytes: int = DEFAULT_BUCKET_BYTES
    group: Optional[Any] = attrs.field(default=None, eq=False, repr=False)
    place: Optional[Place] = attrs.field(default=None, eq=False, repr=False)

    def __call__(self, state_dict: Any, /) -> Any:
        if not is_distributed():
            return state_dict
        return announce(state_dict, group=self.group).deliver(bucket_bytes=self.bucket_bytes, place=self.place)


def broadcast_from_rank0(
    *,
    bucket_bytes: int = DEFAULT_BUCKET_BYTES,
    group: Optional[dist.ProcessGroup] = None,
    place: Optional[Place] = None,
) -> Transform:
    """Return a transform that gives every rank rank 0's state dict:
    :func:`announce`, then :meth:`Announcement.deliver`.

    Collective: call on every rank; the input of ranks other than 0 is
    ignored (pass ``{}``). Rank 0 sends the structure, keys, shapes, dtypes
    and non-tensor values first, then the tensors in buckets of one dtype and
    at most ``bucket_bytes / 2`` (a larger tensor goes alone), two in flight
    so that packing overlaps sending; extra memory stays near ``bucket_bytes``
    (plus the largest tensor). Received tensors are views of their bucket, on
    the process group's device (rank 0 keeps its own tensors where they are
    on that device already), unless ``place(path, tensor)`` is given: it
    is applied to each tensor as soon as its bucket arrives (its result is
    kept), so a rank that keeps only its shard (:func:`~sdtree.transforms.sharding.shard_as`) frees each
    bucket before the next. A bad input on rank 0 raises the same error on
    every rank. Outside a process group it returns its input.
    """
    return _BroadcastFromRank0(bucket_bytes, group, place)


@attrs.frozen(eq=False, repr=False)
class Announcement:
    """Rank 0's state dict (or state dicts) as every rank knows it before any
    tensor moves: its structure, its non-tensor values, and each tensor's
    shape and dtype (what :func:`announce` broadcast). A load plans (and the
    ranks agree) on :meth:`placeholders`; :meth:`deliver` then moves the
    tensors.

    Attributes:
        meta: what was broadcast: ``"parts"`` (the structure of each state
            dict), ``"values"`` (every leaf, ``None`` for tensors) and
            ``"tensors"`` (``(leaf index, shape, dtype)`` of each tensor).
        leaves: rank 0's leaves, in leaf order; ``[]`` on the other ranks.
        group: the process group.
    """

    meta: dict[str, Any]
    leaves: list[Any]
    group: Optional[Any] = None

    @property
    def tensors(self) -> list[tuple[int, tuple[int, ...], torch.dtype]]:
        """``(leaf index, shape, dtype)`` of every tensor, in leaf order."""
        tensors: list[tuple[int, tuple[int, ...], torch.dtype]] = self.meta["tensors"]
        return tensors

    def paths(self) -> list[Path]:
        """The path of every leaf, in leaf order (for several state dicts,
        led by the state dict's position)."""
        parts = self.meta["parts"]
        if len(parts) == 1:
            return _part_paths(parts[0])
        return [(i, *path) for i, part in enumerate(parts) for path in _part_paths(part)]

    def tree(self, leaves: list[Any]) -> Any:
        """The announced structure over ``leaves`` (one per leaf, in order):
        a state dict, or a tuple of them when several were announced."""
        parts = self.meta["parts"]
        if len(parts) == 1:
            return _part_tree(parts[0], leaves)
        out = []
        start = 0
        for part in parts:
            out.append(_part_tree(part, leaves[start : start + part["count"]]))
            start += part["count"]
        return tuple(out)

    def placeholders(self) -> Any:
        """The announced state dict with a meta-device tensor of each tensor's
        shape and dtype in its place (no memory, nothing moved). Tensors of
        one shape and dtype share one placeholder: treat them as read-only."""
        leaves = list(self.meta["values"])
        made: dict[tuple[tuple[int, ...], torch.dtype], torch.Tensor] = {}
        for index, shape, dtype in self.tensors:
            placeholder = made.get((shape, dtype))
            if placeholder is None:
                placeholder = made[shape, dtype] = torch.empty(shape, dtype=dtype, device="meta")
            leaves[index] = placeholder
        return self.tree(leaves)

    def deliver(self, *, bucket_bytes: int = DEFAULT_BUCKET_BYTES, place: Optional[Place] = None) -> Any:
        """Move the tensors from rank 0 and return the state dict on every rank.

        Tensors travel in buckets of one dtype and at most ``bucket_bytes / 2``
        (a larger tensor goes alone), two in flight so that packing overlaps
        sending. Each tensor becomes ``place(path, tensor)`` when ``place`` is
        given (applied as soon as its bucket arrives, so a rank that keeps
        only its shard frees each bucket), else the tensor itself: a view of
        its bucket, on the process group's device (rank 0 keeps its own
        tensors where they are on it already).

        An error in ``place`` is raised after the last bucket has moved, so
        that the other ranks do not wait forever.

        Collective (outside a process group, rank 0's tensors go straight to
        ``place``): call on every rank, after :func:`announce`.
        """
        out = list(self.meta["values"])
        paths = self.paths() if place else []

        def land(arrived: list[tuple[int, torch.Tensor]]) -> None:
            if place is None:
                for index, tensor in arrived:
                    out[index] = tensor
            else:
                for index, tensor in arrived:
                    out[index] = place(paths[index], tensor)

        broadcast_buckets(self.tensors, self.leaves, land, bucket_bytes=bucket_bytes, group=self.group)
        # the buckets now live on only in the tensors ``place`` left as views of them
        return self.tree(out)


def _part_paths(part: Mapping[str, Any]) -> list[Path]:
    keys = part.get("keys")
    return [(key,) for key in keys] if keys is not None else part["spec"].paths()


def _part_tree(part: Mapping[str, Any], leaves: list[Any]) -> Any:
    keys = part.get("keys")
    if keys is not None:
        return (OrderedDict if part["ordered"] else dict)(zip(keys, leaves))
    return tree_unflatten(part["spec"], leaves)


def announce(*state_dicts: Any, group: Optional[dist.ProcessGroup] = None) -> Announcement:
    """Broadcast what rank 0's ``state_dict`` holds (structure, keys, shapes,
    dtypes, non-tensor values) but no tensor data: the first half of
    :func:`broadcast_from_rank0`, so that a load can be planned and agreed
    on before any tensor moves.

    Several state dicts (a model's and its optimizers') are announced in the
    same metadata broadcast, and then delivered as one tuple in one stream
    of buckets.

    Collective: one metadata broadcast; the input of ranks other than 0 is
    ignored. A bad input on rank 0 (not a mapping, ShardedTensors) raises
    the same error on every rank. Outside a process group, this process is rank 0.

    Raises:
        NotAMappingError: rank 0's input is not a state dict it can send.
    """
    distributed = is_distributed()
    this_rank = rank(group)
    leaves: list[Any] = []
    meta: Any = None
    if this_rank == 0:
        leaves, meta = _describe(state_dicts)
    if distributed:
        box = [meta]
        dist.broadcast_object_list(box, group=group, group_src=0)
        meta = box[0]
    if "error" in meta:
        raise NotAMappingError(f"broadcast_from_rank0: {meta['error']} (seen on rank {this_rank}).")
    return Announcement(meta, leaves, group)


# Values that are leaves of every tree: a dict of only these is sent as its keys.
_SCALARS = (torch.Tensor, int, float, str, type(None))


def _describe(state_dicts: tuple[Any, ...]) -> tuple[list[Any], dict[str, Any]]:
    """Rank 0's leaves, and what the other ranks need to receive them: the
    structure of each state dict, the non-tensor values, and each tensor's
    index, shape and dtype (or an error every rank raises).

    A dict of tensors and scalars, the usual state dict, travels as its list
    of keys: a tenth of the bytes of its treespec and a third of the time to
    encode and decode.
    """
    leaves: list[Any] = []
    parts = []
    for state_dict in state_dicts:
        if not isinstance(state_dict, Mapping):  # every rank must learn of it, or the others hang
            return [], {"error": f"rank 0 holds a {type(state_dict).__name__}, expected a state dict (a Mapping)"}
        flat = type(state_dict) in (dict, OrderedDict)
        part_leaves = list(state_dict.values()) if flat else []
        if flat and not all(isinstance(leaf, _SCALARS) for leaf in part_leaves):
            flat = False
        if flat:
            parts.append({"keys": list(state_dict), "ordered": type(state_dict) is OrderedDict, "count": len(part_leaves)})
        else:  # a treespec: no per-tensor placeholder objects to pickle
            part_leaves, spec = tree_flatten(state_dict)
            parts.append({"spec": spec, "count": len(part_leaves)})
        leaves.extend(part_leaves)
    sharded = sharded_tensor_type()
    tensor = torch.Tensor
    tensors = []
    values: list[Any] = [None] * len(leaves)
    for i, leaf in enumerate(leaves):
        if isinstance(leaf, tensor):
            if sharded and isinstance(leaf, sharded):
                return [], {"error": "rank 0 holds ShardedTensors; gather them first (gather_dtensors())"}
            tensors.append((i, tuple(leaf.shape), leaf.dtype))
        else:
            values[i] = leaf
    return leaves, {"parts": parts, "values": values, "tensors": tensors}
