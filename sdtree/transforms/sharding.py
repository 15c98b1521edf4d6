"""Sharding arithmetic: this rank's part of a full tensor, laid out as a
DTensor template is.

Not collective: every rank holds the full tensors and keeps its own slices.
Results share no memory with their inputs (:func:`local_slice`, a view, is
the one exception and says so).
"""

from __future__ import annotations

import functools
import sys
import weakref
from collections.abc import Mapping
from typing import Any, Optional

import attrs
import torch
import torch.distributed as dist

from sdtree.transforms.compose import Transform
from sdtree.transforms.tensors import is_dtensor

__all__ = ["shard_like", "shard_as", "local_slice", "row_counts", "rows_by_rank"]


@functools.lru_cache(maxsize=4096)
def row_counts(rows: int, world: int) -> tuple[int, ...]:
    """Rows each rank holds when ``rows`` are split as ``torch.chunk`` splits them.

    Cached: a model's tensors share few leading sizes, and this runs once per
    tensor of a gather or a sharded load.

    >>> row_counts(5, 2)
    (3, 2)
    """
    chunk = -(-rows // world)
    return tuple(max(0, min(chunk, rows - r * chunk)) for r in range(world))


_positions: weakref.WeakKeyDictionary[Any, tuple[int, int]] = weakref.WeakKeyDictionary()


def _position(mesh: Any) -> tuple[int, int]:
    """(size, this rank's coordinate) of a 1-D device mesh, remembered per
    mesh: this runs once per tensor of a load, and the mesh computes both."""
    position = _positions.get(mesh)
    if position is None:
        (rank,) = mesh.get_coordinate()
        position = _positions[mesh] = (mesh.size(), rank)
    return position


def local_slice(full: torch.Tensor, template: Any) -> Optional[torch.Tensor]:
    """This rank's part of ``full`` as the DTensor ``template`` lays it out,
    as a view of ``full`` (no copy), for FSDP2's and DDP-like layouts (a 1-D
    mesh, ``Shard(0)`` or ``Replicate``, same shape and dtype); ``None`` for
    any other layout."""
    spec = template._spec  # not the public properties: this runs once per tensor of a load
    placements = spec.placements
    if len(placements) != 1 or full.dtype != template.dtype or full.shape != template.shape:
        return None
    dtensor: Any = sys.modules["torch.distributed.tensor"]
    placement = placements[0]
    if type(placement) is dtensor.Replicate:
        return full.detach()
    if type(placement) is dtensor.Shard and placement.dim == 0:
        size, rank = _position(spec.mesh)
        counts = row_counts(full.shape[0], size)
        start = sum(counts[:rank])
        return full.detach()[start : start + counts[rank]]
    return None


_orders: weakref.WeakKeyDictionary[Any, tuple[Any, Optional[tuple[int, ...]]]] = weakref.WeakKeyDictionary()


def _coordinates(mesh: Any, group: Optional[dist.ProcessGroup]) -> Optional[tuple[int, ...]]:
    """The mesh coordinate of each rank of ``group`` (by group rank), when
    the 1-D ``mesh`` spans exactly ``group``'s ranks; remembered per mesh."""
    known = _orders.get(mesh)
    if known is not None and known[0] is group:
        return known[1]
    mesh_ranks = [int(r) for r in mesh.mesh.flatten().tolist()]
    group_ranks = dist.get_process_group_ranks(group if group is not None else dist.group.WORLD)
    order = tuple(mesh_ranks.index(r) for r in group_ranks) if sorted(mesh_ranks) == sorted(group_ranks) else None
    _orders[mesh] = (group, order)
    return order


def rows_by_rank(template: Any, group: Optional[dist.ProcessGroup] = None) -> Optional[tuple[int, ...]]:
    """The rows of dim 0 each rank of ``group`` (by group rank) keeps of a
    tensor laid out as the DTensor ``template``, for FSDP2's layout
    (``Shard(0)`` over a 1-D mesh of exactly ``group``'s ranks); ``None``
    for any other layout, or a 0-dim tensor.

    Not collective: what it reads is the same on every rank.
    """
    spec = template._spec
    placements = spec.placements
    if len(placements) != 1 or not template.dim():
        return None
    dtensor: Any = sys.modules["torch.distributed.tensor"]
    if type(placements[0]) is not dtensor.Shard or placements[0].dim != 0:
        return None
    order = _coordinates(spec.mesh, group)
    if order is None:
        return None
    counts = row_counts(template.shape[0], len(order))
    return tuple(counts[c] for c in order)


def shard_as(full: torch.Tensor, template: Any) -> Any:
    """The local shard of ``full`` laid out as the DTensor ``template`` is
    (mesh and placements, strided shards included), as a new DTensor that
    shares no memory with ``full``."""
    dtensor: Any = sys.modules["torch.distributed.tensor"]  # loaded: ``template`` is a DTensor
    local = local_slice(full, template)
    if local is not None:
        # FSDP2's and DDP-like layouts: slice here, reuse the template's spec
        # (DTensor.from_local and distribute_tensor cost ~70us a tensor).
        # a meta template takes the data's device; a meta (placeholder) full tensor gives a meta shard
        device = full.device if template.is_meta or full.is_meta else template._local_tensor.device
        local = local.to(device=device, copy=True, memory_format=torch.contiguous_format)
        return dtensor.DTensor(local, template._spec, requires_grad=False)
    mesh = template.device_mesh
    sharded: Any = dtensor.distribute_tensor(full.detach(), mesh, template.placements, src_data_rank=None)
    if sharded._local_tensor.untyped_storage().data_ptr() == full.untyped_storage().data_ptr():
        sharded = sharded.clone()
    return sharded


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
