"""Collective transforms: functions from state dict to state dict that every
rank of a process group calls in the same order.

Collective: call on every rank. A transform validates its input before its
first collective, because a raise on one rank is a hang on the others.
"""

from __future__ import annotations

import math
import sys
import warnings
from collections.abc import Mapping
from typing import Any, Optional

import attrs
import torch

import torch.distributed as dist

from sdtree._tree import tree_flatten, tree_map, tree_unflatten
from sdtree.errors import NotAMappingError
from sdtree.transforms.compose import Transform

__all__ = ["keep_on_ranks", "gather_dtensors", "broadcast_from_rank0", "shard_like", "shard_as", "DEFAULT_BUCKET_BYTES"]

DEFAULT_BUCKET_BYTES = 64 * 1024 * 1024


def _rank(group: Optional[dist.ProcessGroup]) -> int:
    return dist.get_rank(group) if dist.is_available() and dist.is_initialized() else 0


@attrs.frozen(repr=False)
class _KeepOnRanks(Transform):
    _factory = "keep_on_ranks"
    ranks: tuple[int, ...]
    group: Optional[Any] = attrs.field(default=None, eq=False)

    def __call__(self, state_dict: Any, /) -> Any:
        if _rank(self.group) in self.ranks:
            return state_dict
        return {}


def keep_on_ranks(ranks: tuple[int, ...], *, group: Optional[dist.ProcessGroup] = None) -> Transform:
    """Return a transform that keeps the state dict on ``ranks`` (of ``group``)
    and gives ``{}`` elsewhere. Outside a process group, this process is rank 0.

    Not a collective: it only reads the rank.
    """
    return _KeepOnRanks(tuple(ranks), group)


def _full(value: Any) -> Any:
    from torch.distributed.tensor import DTensor

    if isinstance(value, DTensor):
        return value.full_tensor()
    return value


@attrs.frozen(repr=False)
class _GatherDTensors(Transform):
    _factory = "gather_dtensors"

    def __call__(self, state_dict: Any, /) -> Any:
        return tree_map(_full, state_dict)


def gather_dtensors() -> Transform:
    """Return a transform that replaces every DTensor by its full tensor.

    Collective: call on every rank (each DTensor is gathered over its mesh).
    """
    return _GatherDTensors()




def _is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def pg_device(group: Optional[dist.ProcessGroup] = None) -> torch.device:
    """The device the process group communicates on (CPU for gloo)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return dist.distributed_c10d._get_pg_default_device(group)


def _buckets(specs: list[tuple[Any, torch.Size, torch.dtype]], limit: int) -> list[list[tuple[Any, torch.Size, torch.dtype]]]:
    """Split tensors (in order) into runs of one dtype of at most ``limit`` bytes
    each; a tensor larger than ``limit`` is a bucket of its own."""
    buckets: list[list[tuple[Any, torch.Size, torch.dtype]]] = []
    size = 0
    for spec in specs:
        nbytes = math.prod(spec[1]) * spec[2].itemsize
        if not buckets or buckets[-1][0][2] != spec[2] or size + nbytes > limit:
            buckets.append([])
            size = 0
        buckets[-1].append(spec)
        size += nbytes
    return buckets


@attrs.frozen
class _Slot:
    """Stands for the ``index``-th tensor in a broadcast skeleton."""

    index: int


@attrs.frozen(repr=False)
class _BroadcastFromRank0(Transform):
    _factory = "broadcast_from_rank0"
    bucket_bytes: int = DEFAULT_BUCKET_BYTES
    group: Optional[Any] = attrs.field(default=None, eq=False, repr=False)

    def __call__(self, state_dict: Any, /) -> Any:
        if not _is_distributed():
            return state_dict
        group = self.group
        rank = dist.get_rank(group)
        tensors: list[torch.Tensor] = []
        meta: Any = None
        if rank == 0:
            if isinstance(state_dict, Mapping):
                leaves, spec = tree_flatten(state_dict)
                slots = []
                for leaf in leaves:
                    if isinstance(leaf, torch.Tensor):
                        slots.append(_Slot(len(tensors)))
                        tensors.append(leaf)
                    else:
                        slots.append(leaf)
                meta = {
                    "skeleton": tree_unflatten(spec, slots),
                    "tensors": [(i, t.shape, t.dtype) for i, t in enumerate(tensors)],
                }
            else:  # every rank must learn of it, or the others hang
                meta = {"error": f"rank 0 holds a {type(state_dict).__name__}, expected a state dict (a Mapping)"}
        box = [meta]
        dist.broadcast_object_list(box, group=group, group_src=0)
        meta = box[0]
        if "error" in meta:
            raise NotAMappingError(f"broadcast_from_rank0: {meta['error']} (seen on rank {rank}).")
        device = pg_device(group)
        received: dict[int, torch.Tensor] = {}
        for bucket in _buckets(meta["tensors"], self.bucket_bytes):
            numels = [math.prod(shape) for _, shape, _ in bucket]
            buffer = torch.empty(sum(numels), dtype=bucket[0][2], device=device)
            views = []
            offset = 0
            for (index, shape, _), numel in zip(bucket, numels):
                views.append((index, buffer[offset : offset + numel], shape))
                offset += numel
            if rank == 0:
                with torch.no_grad():
                    for index, view, _ in views:
                        view.copy_(tensors[index].detach().reshape(-1))
            dist.broadcast(buffer, group=group, group_src=0)
            for index, view, shape in views:
                received[index] = view.view(shape)
        return tree_map(lambda leaf: received[leaf.index] if isinstance(leaf, _Slot) else leaf, meta["skeleton"])


def broadcast_from_rank0(
    *, bucket_bytes: int = DEFAULT_BUCKET_BYTES, group: Optional[dist.ProcessGroup] = None
) -> Transform:
    """Return a transform that gives every rank rank 0's state dict.

    Collective: call on every rank; the input of ranks other than 0 is
    ignored (pass ``{}``). Rank 0 sends the structure, keys, shapes, dtypes
    and non-tensor values first, then the tensors in buckets of one dtype and
    at most ``bucket_bytes`` (a larger tensor goes alone), so extra memory
    stays near one bucket. Received tensors are views of their bucket, on
    the process group's device. A bad input on rank 0 raises the same error
    on every rank. Outside a process group it returns its input.
    """
    return _BroadcastFromRank0(bucket_bytes, group)


def shard_as(full: torch.Tensor, template: Any) -> Any:
    """The local shard of ``full`` laid out as the DTensor ``template`` is
    (mesh and placements, strided shards included), as a new DTensor that
    shares no memory with ``full``.

    Not a collective: every rank holds ``full`` and keeps its own slice.
    """
    from torch.distributed.tensor import distribute_tensor

    sharded: Any = distribute_tensor(full.detach(), template.device_mesh, template.placements, src_data_rank=None)
    if sharded._local_tensor.untyped_storage().data_ptr() == full.untyped_storage().data_ptr():
        sharded = sharded.clone()
    return sharded


def is_dtensor(value: Any) -> bool:
    dtensor = sys.modules.get("torch.distributed.tensor")
    return dtensor is not None and isinstance(value, dtensor.DTensor)


@attrs.frozen(repr=False)
class _ShardLike(Transform):
    _factory = "shard_like"
    templates: Mapping[str, Any] = attrs.field(eq=False)

    def __call__(self, state_dict: Mapping[str, Any], /) -> dict[str, Any]:
        templates = self.templates
        out = dict(state_dict)
        for key, template in templates.items():
            value = out.get(key)
            if isinstance(value, torch.Tensor) and not is_dtensor(value) and value.dim() > 0:
                out[key] = shard_as(value, template)
        return out

    def __repr__(self) -> str:
        return f"shard_like(<{len(self.templates)} DTensor templates>)"


def shard_like(templates: Mapping[str, Any]) -> Transform:
    """Return a transform that replaces each full tensor at a key of
    ``templates`` by its local shard, laid out as that key's template DTensor.

    Other keys, DTensors and 0-dim tensors pass through. Not a collective:
    every rank holds the full tensors and keeps its own slices.
    """
    return _ShardLike(dict(templates))
