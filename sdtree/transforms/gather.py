"""Gather sharded tensors into full tensors, and keep a result on some ranks only.

``gather_dtensors`` replaces every DTensor (and FSDP1's legacy
``ShardedTensor``) by its full tensor, in buckets; ``keep_on_ranks`` gives
``{}`` on the other ranks (the ``ranks_only`` of torch's utilities).

Collective (``gather_dtensors``): call on every rank, with state dicts
holding the same DTensors in the same order. Inputs are never written.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Iterator
from typing import Any, Optional

import attrs
import torch
import torch.distributed as dist

from sdtree._collectives import DEFAULT_BUCKET_BYTES, all_gather_single, buckets, pg_device, rank, two_in_flight
from sdtree._tree import tree_flatten, tree_unflatten
from sdtree.transforms.compose import Transform
from sdtree.transforms.sharding import row_counts
from sdtree.transforms.tensors import check_leaf_types, offload_to_cpu, sharded_tensor_type

__all__ = ["gather_dtensors", "keep_on_ranks", "gather_state_dict"]


@attrs.frozen(repr=False)
class _KeepOnRanks(Transform):
    _factory = "keep_on_ranks"
    ranks: tuple[int, ...]
    group: Optional[Any] = attrs.field(default=None, eq=False)

    def __call__(self, state_dict: Any, /) -> Any:
        if rank(self.group) in self.ranks:
            return state_dict
        return {}


def keep_on_ranks(ranks: tuple[int, ...], *, group: Optional[dist.ProcessGroup] = None) -> Transform:
    """Return a transform that keeps the state dict on ``ranks`` (of ``group``)
    and gives ``{}`` elsewhere. Outside a process group, this process is rank 0.

    Not a collective: it only reads the rank.
    """
    return _KeepOnRanks(tuple(ranks), group)


@attrs.frozen(repr=False)
class _GatherDTensors(Transform):
    _factory = "gather_dtensors"
    cpu_offload: bool = False
    bucket_bytes: int = DEFAULT_BUCKET_BYTES

    def __call__(self, state_dict: Any, /) -> Any:
        leaves, spec = tree_flatten(state_dict)
        dtensor: Any = sys.modules.get("torch.distributed.tensor")
        sharded_tensor_cls = sharded_tensor_type()
        if dtensor is None and not sharded_tensor_cls:
            return tree_unflatten(spec, leaves)
        dtensor_cls = dtensor.DTensor if dtensor is not None else ()
        shard_cls = dtensor.Shard if dtensor is not None else ()
        batches: dict[tuple[int, torch.dtype], list[int]] = {}
        for i, leaf in enumerate(leaves):
            if isinstance(leaf, dtensor_cls):
                # FSDP2's layout (dim 0 over a 1-D mesh) in buckets; the rest one by one
                placements = leaf._spec.placements
                mesh = leaf._spec.mesh
                if len(placements) == 1 and type(placements[0]) is shard_cls and placements[0].dim == 0 and leaf.dim():
                    batches.setdefault((id(mesh), leaf.dtype), []).append(i)
                else:
                    leaves[i] = self._done(leaf.full_tensor())
            elif isinstance(leaf, sharded_tensor_cls):
                leaves[i] = self._done(_gather_sharded_tensor(leaf))
        # dict order follows the state dict's order, the same on every rank.
        # Two buckets (of half the budget each) in flight: the next one is packed
        # and the previous one unpacked while a gather is on the wire.
        two_in_flight(self._gather_buckets(leaves, batches))
        return tree_unflatten(spec, leaves)

    def _gather_buckets(self, leaves: list[Any], batches: dict[Any, list[int]]) -> Iterator[Callable[[], None]]:
        for indices in batches.values():
            specs = [(i, leaves[i].shape, leaves[i].dtype) for i in indices]
            for bucket in buckets(specs, max(1, self.bucket_bytes // 2)):
                yield self._gather_bucket(leaves, [i for i, _, _ in bucket])

    def _done(self, full: torch.Tensor) -> torch.Tensor:
        return full.cpu() if self.cpu_offload else full

    def _gather_bucket(self, leaves: list[Any], indices: list[int]) -> Callable[[], None]:
        """Start one all_gather for the bucket; return what waits for it and
        puts the full tensors into ``leaves``. Evenly split tensors of one
        shard length are packed side by side, so that a single transposing
        copy turns the gathered buffer into their full tensors; a bucket of
        one even tensor gathers straight into its full tensor."""
        first = leaves[indices[0]]
        group = first.device_mesh.get_group()
        world = dist.get_world_size(group)
        even: dict[int, list[int]] = {}  # shard length -> tensors
        uneven = []
        # per shape: (shard length, None) when it splits evenly, else (row length, rows per rank)
        layouts: dict[torch.Size, tuple[int, Optional[tuple[int, ...]]]] = {}
        for i in indices:
            shape = leaves[i].shape
            layout = layouts.get(shape)
            if layout is None:
                counts = row_counts(shape[0], world)
                row = math.prod(shape[1:])
                layout = layouts[shape] = (counts[0] * row, None) if counts.count(counts[0]) == world else (row, counts)
            length, uneven_counts = layout
            if uneven_counts is None:
                even.setdefault(length, []).append(i)
            else:
                # every rank sends its rows padded to the most any rank holds
                uneven.append((i, uneven_counts, length, max(uneven_counts) * length))
        device = first._local_tensor.device
        if len(indices) == 1 and even:
            (i,) = indices
            full = torch.empty(leaves[i].shape, dtype=first.dtype, device=device)
            work = all_gather_single(full, leaves[i]._local_tensor.contiguous(), group=group, async_op=True)

            def finish_one() -> None:
                work.wait()
                leaves[i] = self._done(full)

            return finish_one
        pieces: list[torch.Tensor] = []
        for length, group_indices in even.items():
            pieces.append(torch._C._nn.flatten_dense_tensors([leaves[i]._local_tensor for i in group_indices]))
        for i, _, _, width in uneven:
            local = leaves[i]._local_tensor.reshape(-1)
            pieces.append(torch.cat([local, local.new_zeros(width - local.numel())]) if local.numel() < width else local)
        send = torch.cat(pieces) if len(pieces) > 1 else pieces[0]
        size = send.numel()
        recv = torch.empty(world * size, dtype=first.dtype, device=device).view(world, size)
        work = all_gather_single(recv.view(-1), send, group=group, async_op=True)
        return lambda: self._unpack(leaves, work, recv, even, uneven)

    def _unpack(
        self,
        leaves: list[Any],
        work: Any,
        recv: torch.Tensor,
        even: dict[int, list[int]],
        uneven: list[tuple[int, tuple[int, ...], int, int]],  # index, rows per rank, row length, padded width
    ) -> None:
        work.wait()
        world = recv.shape[0]
        offset = 0
        for length, group_indices in even.items():
            n = len(group_indices)
            # rank-major as gathered -> tensor-major: one copy, then a view per tensor
            block = recv[:, offset : offset + n * length].reshape(world, n, length).transpose(0, 1).contiguous()
            offload = self.cpu_offload
            for i, full in zip(group_indices, block.view(n, world * length).unbind(0)):
                shape = leaves[i].shape
                full = full if len(shape) == 1 else full.view(shape)
                leaves[i] = full.cpu() if offload else full
            offset += n * length
        for i, counts, row, width in uneven:
            parts = [recv[r, offset : offset + counts[r] * row] for r in range(world)]
            leaves[i] = self._done(torch.cat(parts).view(leaves[i].shape))
            offset += width


def _gather_sharded_tensor(value: Any) -> torch.Tensor:
    """The full tensor of a legacy ``ShardedTensor`` (any shards, any number
    per rank), with one all-gather of each rank's shards packed flat, on the
    device of the local shards."""
    group = value._process_group
    world = dist.get_world_size(group)
    by_rank: list[list[Any]] = [[] for _ in range(world)]
    for shard in value.metadata().shards_metadata:
        global_rank = shard.placement.rank()
        by_rank[dist.get_group_rank(group, global_rank) if group is not None else global_rank].append(shard)
    for shards in by_rank:  # the same order on every rank, whatever order they were listed in
        shards.sort(key=lambda s: tuple(s.shard_offsets))
    width = max(sum(math.prod(s.shard_sizes) for s in shards) for shards in by_rank)
    local = sorted(value.local_shards(), key=lambda s: tuple(s.metadata.shard_offsets))
    device = local[0].tensor.device if local else pg_device(group)
    send = torch.zeros(width, dtype=value.dtype, device=device)
    if local:
        torch.cat([s.tensor.reshape(-1) for s in local], out=send[: sum(s.tensor.numel() for s in local)])
    recv = torch.empty(world * width, dtype=value.dtype, device=device)
    all_gather_single(recv, send, group=group)
    full = torch.empty(value.size(), dtype=value.dtype, device=device)
    for r, shards in enumerate(by_rank):
        offset = r * width
        for shard in shards:
            numel = math.prod(shard.shard_sizes)
            region = full[tuple(slice(o, o + n) for o, n in zip(shard.shard_offsets, shard.shard_sizes))]
            region.copy_(recv[offset : offset + numel].view(shard.shard_sizes))
            offset += numel
    return full


def gather_dtensors(*, cpu_offload: bool = False, bucket_bytes: int = DEFAULT_BUCKET_BYTES) -> Transform:
    """Return a transform that replaces every DTensor (and legacy
    ``ShardedTensor``, as FSDP1 gives) by its full tensor.

    DTensors sharded on dim 0 over a 1-D mesh (FSDP2) are gathered in
    buckets of one dtype and at most ``bucket_bytes / 2`` of gathered data,
    one ``all_gather`` per bucket, two in flight (the next bucket is packed
    while one is on the wire); other layouts (2-D meshes, other dims,
    strided shards) and ShardedTensors one by one. With ``cpu_offload`` each full tensor moves
    to CPU as soon as it is assembled, so device memory stays near one bucket.

    Collective: call on every rank, with state dicts holding the same
    DTensors in the same order.
    """
    return _GatherDTensors(cpu_offload, bucket_bytes)


# -- the utility with torch's signature ----------------------------------------


def gather_state_dict(
    state_dict: dict[str, Any],
    *,
    pg: Optional[dist.ProcessGroup] = None,
    device: Optional[torch.device] = None,
    cpu_offload: bool = False,
    ranks_only: tuple[int, ...] = (),
    type_check: bool = True,
) -> dict[str, Any]:
    """Return ``state_dict`` with every DTensor and ShardedTensor gathered
    into a full tensor (torch's ``_gather_state_dict``), in buckets (see
    :func:`gather_dtensors`).

    Collective: call on every rank. ``pg`` is the group ``ranks_only`` refers
    to (DTensors and ShardedTensors gather over their own groups); ``device``
    is accepted for torch's signature (full tensors land on the device of
    the shards, as torch's do).

    Raises:
        UnsupportedLeafError: ``type_check`` and a value DCP cannot save.
    """
    if type_check:
        check_leaf_types("gather_state_dict", state_dict)
    out: dict[str, Any] = gather_dtensors(cpu_offload=cpu_offload)(state_dict)
    if cpu_offload:
        out = offload_to_cpu(bulk=False)(out)
    if ranks_only:
        out = keep_on_ranks(ranks_only, group=pg)(out)
    return out
