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

import sys
from collections import OrderedDict
from collections.abc import Callable, Mapping
from typing import Any, Optional

import attrs
import torch
import torch.distributed as dist

from sdtree._collectives import DEFAULT_BUCKET_BYTES, Rows, broadcast_buckets, broadcast_object, is_distributed, pg_device, rank
from sdtree._tree import tree_flatten, tree_unflatten
from sdtree.errors import NotAMappingError, UnsupportedLeafError
from sdtree.transforms.compose import Transform
from sdtree.transforms.sharding import rows_by_rank
from sdtree.transforms.tensors import dtensor_type, sharded_tensor_type

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

    def deliver(
        self,
        *,
        bucket_bytes: int = DEFAULT_BUCKET_BYTES,
        place: Optional[Place] = None,
        shards: Optional[Callable[[Path], Any]] = None,
        into: Optional[Callable[[Path], Any]] = None,
    ) -> Any:
        """Move the tensors from rank 0 and return the state dict on every rank.

        A tensor of at least ``ALONE_BYTES`` (or more than ``bucket_bytes /
        2``) travels alone and as it is: rank 0 sends its own tensor (when
        contiguous and on the process group's device) and the others receive
        it into its destination (see ``into``) or into new memory; smaller
        ones travel in buckets of one dtype and at most ``bucket_bytes / 2``;
        two collectives are in flight. Each tensor lands in the first of:

        - ``shards(path)`` (or ``into(path)``), a DTensor of the tensor's
          shape and dtype laid out as FSDP2 lays out (``Shard(0)`` over a 1-D
          mesh of the process group's ranks): rank 0 scatters the tensor, so
          each rank receives only the rows it keeps, and the tensor becomes
          a DTensor laid out as that one, on its rows (written into
          ``into``'s DTensor's local tensor, which is returned, when it has
          memory);
        - ``into(path)``, a tensor of the same shape and dtype, contiguous,
          not in inference mode, on the process group's device, and not
          another view of the sent tensor's memory: written in place
          (received straight into it when the tensor travels alone) and
          returned;
        - ``place(path, tensor)``, applied as soon as the tensor arrives (its
          result is kept, so a rank that keeps only its shard frees each
          bucket);
        - the tensor itself: a view of its bucket, or a tensor of its own
          (rank 0 keeps its own tensors where they are on the group's device).

        Only ``into``'s tensors are written. DTensors or meta tensors on
        rank 0 raise ``UnsupportedLeafError`` on every rank before any tensor
        moves. An error while landing (in
        ``place``, or a copy) is raised after the last tensor has moved, so
        that the other ranks do not wait forever.

        Collective (outside a process group, rank 0's tensors go straight to
        ``into`` and ``place``, and nothing is scattered): call on every
        rank, after :func:`announce`, with the same DTensor layouts from
        ``shards`` and ``into`` on every rank.
        """
        unsendable = self.meta.get("unsendable")
        if unsendable:  # known to every rank: all raise before any tensor moves
            raise UnsupportedLeafError(f"broadcast_from_rank0: {unsendable} (seen on rank {rank(self.group)}).")
        leaves = self.leaves
        distributed = is_distributed()
        device = pg_device(self.group) if distributed else None
        paths = self.paths() if place or shards or into else []
        targets: dict[int, torch.Tensor] = {}  # received into
        layouts: dict[int, Any] = {}  # scattered: the DTensor whose layout the rows take
        rows: dict[int, Rows] = {}
        this_rank = rank(self.group)
        dtensor = dtensor_type()
        for index, shape, dtype in self.tensors if shards or into else ():
            path = paths[index]
            target = into(path) if into else None
            template: Any = target if isinstance(target, dtensor) else shards(path) if shards else None
            if distributed and template is not None and tuple(template.shape) == shape and template.dtype == dtype:
                split = rows_by_rank(template, self.group)
                if split is not None:
                    rows[index], layouts[index] = split, template
                    local = template._local_tensor if isinstance(target, dtensor) else None
                    if local is not None and not local.is_meta and _fits(local, (split[this_rank], *shape[1:]), dtype, device):
                        targets[index] = local
                    continue
            if target is not None and not isinstance(target, dtensor):
                if _fits(target, shape, dtype, device if device is not None else leaves[index].device):
                    targets[index] = target
        out = list(self.meta["values"])

        def land(arrived: list[tuple[int, torch.Tensor]]) -> None:
            if not targets and not layouts and place is None:  # each tensor as it arrives
                for index, tensor in arrived:
                    out[index] = tensor
                return
            copy_to: list[torch.Tensor] = []
            copy_from: list[torch.Tensor] = []
            for index, tensor in arrived:
                target = targets.get(index)
                if target is not None and target.untyped_storage().data_ptr() == tensor.untyped_storage().data_ptr():
                    if target.data_ptr() == tensor.data_ptr() and target.stride() == tensor.stride():
                        out[index] = layouts.get(index, target)  # received straight into it, or rank 0 sent it itself
                        continue
                    target = None  # another view of the destination's memory: not copied into itself
                template = layouts.get(index)
                if target is not None:
                    copy_to.append(target)
                    copy_from.append(tensor)
                    out[index] = template if template is not None else target
                elif template is not None:  # this rank's rows, in memory of their own
                    out[index] = _as_shard(tensor, template)
                else:
                    out[index] = place(paths[index], tensor) if place else tensor
            if copy_to:  # one call for a bucket's tensors (each copy_ alone costs microseconds)
                torch._foreach_copy_(copy_to, copy_from)

        broadcast_buckets(
            self.tensors, leaves, land, bucket_bytes=bucket_bytes, group=self.group, receive_into=targets.get, split=rows.get
        )
        # the buckets now live on only in the tensors ``place`` left as views of them
        return self.tree(out)


def _fits(target: torch.Tensor, shape: tuple[int, ...], dtype: torch.dtype, device: Optional[torch.device]) -> bool:
    """Whether a tensor can be received straight into ``target``."""
    return (
        tuple(target.shape) == shape
        and target.dtype == dtype
        and target.is_contiguous()
        and not target.is_inference()
        and target.device == device
    )


def _as_shard(rows: torch.Tensor, template: Any) -> Any:
    """This rank's ``rows`` (its own memory) as a DTensor laid out as ``template``."""
    dtensor: Any = sys.modules["torch.distributed.tensor"]
    if not template.is_meta and rows.device != template._local_tensor.device:
        rows = rows.to(template._local_tensor.device)
    return dtensor.DTensor(rows, template._spec, requires_grad=False)


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
        meta = broadcast_object(meta, group=group)
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
    dtensor = dtensor_type()
    unsendable: Optional[str] = None
    tensor = torch.Tensor
    tensors = []
    values: list[Any] = [None] * len(leaves)
    for i, leaf in enumerate(leaves):
        if isinstance(leaf, tensor):
            if sharded and isinstance(leaf, sharded):
                return [], {"error": "rank 0 holds ShardedTensors; gather them first (gather_dtensors())"}
            if unsendable is None and isinstance(leaf, dtensor):  # announced (placeholders), but not delivered
                unsendable = "rank 0 holds DTensors; gather them into full tensors first (gather_dtensors())"
            elif unsendable is None and leaf.is_meta:
                unsendable = "rank 0 holds meta tensors, which have no data to send; pass tensors with memory"
            tensors.append((i, tuple(leaf.shape), leaf.dtype))
        else:
            values[i] = leaf
    return leaves, {"parts": parts, "values": values, "tensors": tensors, "unsendable": unsendable}
