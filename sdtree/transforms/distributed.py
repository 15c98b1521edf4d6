"""Collective transforms: functions from state dict to state dict that every
rank of a process group calls in the same order.

Collective: call on every rank. A transform validates its input before its
first collective, because a raise on one rank is a hang on the others.
"""

from __future__ import annotations

import functools
import math
import sys
import warnings
import weakref
from collections import OrderedDict
from collections.abc import Callable, Mapping
from typing import Any, Optional

import attrs
import torch
import torch.distributed as dist

from sdtree._tree import tree_flatten, tree_unflatten
from sdtree.errors import NotAMappingError, StructureMismatchError, _preview
from sdtree.transforms.compose import Transform
from sdtree.transforms.tensors import dtensor_type, sharded_tensor_type

# Two buckets of half this size are in flight in a gather or a broadcast: one
# on the wire while the other is packed or unpacked. 16 MiB measured best of
# 4 to 64 MiB on CPU/gloo (smaller buffers come back from the allocator
# without fresh page faults), and a collective of 8 MiB is already near the
# bandwidth of NCCL.
DEFAULT_BUCKET_BYTES = 16 * 1024 * 1024

# torch 2.13 renamed all_gather_into_tensor (and deprecated the old name);
# sdtree supports torch from 2.6.
_all_gather_single: Callable[..., Any] = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor

__all__ = [
    "keep_on_ranks",
    "gather_dtensors",
    "broadcast_from_rank0",
    "announce",
    "Announcement",
    "shard_like",
    "shard_as",
    "local_slice",
    "gather_state_dict",
    "distribute_state_dict",
    "distribute_tensors",
    "broadcast_state_dict",
    "DEFAULT_BUCKET_BYTES",
]


def is_distributed() -> bool:
    """Whether a default process group is up."""
    return dist.is_available() and dist.is_initialized()


def _rank(group: Optional[dist.ProcessGroup]) -> int:
    return dist.get_rank(group) if is_distributed() else 0


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


@functools.lru_cache(maxsize=4096)
def _row_counts(rows: int, world: int) -> tuple[int, ...]:
    """Rows each rank holds when ``rows`` are split as torch.chunk splits them
    (cached: a model's tensors share few leading sizes, and this runs once
    per tensor of a gather or a sharded load)."""
    chunk = -(-rows // world)
    return tuple(max(0, min(chunk, rows - r * chunk)) for r in range(world))


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
        in_flight: list[Callable[[], None]] = []
        for indices in batches.values():
            specs = [(i, leaves[i].shape, leaves[i].dtype) for i in indices]
            for bucket in _buckets(specs, max(1, self.bucket_bytes // 2)):
                in_flight.append(self._gather_bucket(leaves, [i for i, _, _ in bucket]))
                if len(in_flight) == 2:
                    in_flight.pop(0)()
        while in_flight:
            in_flight.pop(0)()
        return tree_unflatten(spec, leaves)

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
                counts = _row_counts(shape[0], world)
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
            work = _all_gather_single(full, leaves[i]._local_tensor.contiguous(), group=group, async_op=True)

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
        work = _all_gather_single(recv.view(-1), send, group=group, async_op=True)
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
    _all_gather_single(recv, send, group=group)
    full = torch.empty(value.size(), dtype=value.dtype, device=device)
    for rank, shards in enumerate(by_rank):
        offset = rank * width
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


@attrs.frozen(repr=False)
class _BroadcastFromRank0(Transform):
    _factory = "broadcast_from_rank0"
    bucket_bytes: int = DEFAULT_BUCKET_BYTES
    group: Optional[Any] = attrs.field(default=None, eq=False, repr=False)
    place: Optional[Callable[[tuple[Any, ...], torch.Tensor], Any]] = attrs.field(default=None, eq=False, repr=False)

    def __call__(self, state_dict: Any, /) -> Any:
        if not is_distributed():
            return state_dict
        return announce(state_dict, group=self.group).deliver(bucket_bytes=self.bucket_bytes, place=self.place)


Path = tuple[Any, ...]


@attrs.frozen(eq=False, repr=False)
class Announcement:
    """Rank 0's state dict as every rank knows it before any tensor moves:
    its structure, its non-tensor values, and each tensor's shape and dtype
    (what :func:`announce` broadcast). A load plans (and the ranks agree)
    on :meth:`placeholders`; :meth:`deliver` then moves the tensors."""

    meta: dict[str, Any]
    leaves: list[Any]  # rank 0's leaves; [] on the other ranks
    group: Optional[Any] = None

    def paths(self) -> list[Path]:
        """The path of every leaf, in leaf order."""
        keys = self.meta.get("keys")
        return [(key,) for key in keys] if keys is not None else self.meta["spec"].paths()

    def _tree(self, leaves: list[Any]) -> Any:
        keys = self.meta.get("keys")
        if keys is not None:
            return (OrderedDict if self.meta["ordered"] else dict)(zip(keys, leaves))
        return tree_unflatten(self.meta["spec"], leaves)

    def placeholders(self) -> Any:
        """The announced state dict with a meta-device tensor of each tensor's
        shape and dtype in its place (no memory, nothing moved). Tensors of
        one shape and dtype share one placeholder: treat them as read-only."""
        leaves = list(self.meta["values"])
        made: dict[tuple[tuple[int, ...], torch.dtype], torch.Tensor] = {}
        for index, shape, dtype in self.meta["tensors"]:
            placeholder = made.get((shape, dtype))
            if placeholder is None:
                placeholder = made[shape, dtype] = torch.empty(shape, dtype=dtype, device="meta")
            leaves[index] = placeholder
        return self._tree(leaves)

    def deliver(
        self,
        *,
        bucket_bytes: int = DEFAULT_BUCKET_BYTES,
        place: Optional[Callable[[Path, torch.Tensor], Any]] = None,
        into: Optional[Callable[[Path], Optional[torch.Tensor]]] = None,
    ) -> Any:
        """Move the tensors from rank 0 and return the state dict on every rank.

        Tensors travel in buckets of one dtype and at most ``bucket_bytes / 2``
        (a larger tensor goes alone), two in flight so that packing overlaps
        sending. Each tensor then lands in the first of:

        - ``into(path)``, a tensor of the same shape and dtype, contiguous,
          not in inference mode, on the process group's device, and not
          another view of the sent tensor's memory: written in place (a tensor
          alone in its bucket is received straight into it) and returned;
        - ``place(path, tensor)``: its result is kept, as soon as the bucket
          arrives (so a rank that keeps only its shard frees each bucket);
        - the tensor itself: a view of its bucket, on the process group's
          device (rank 0 keeps its own tensors where they are on it already).

        An error while landing (in ``place``, or a copy) is raised after the
        last bucket has moved, so that the other ranks do not wait forever.

        Collective (outside a process group, rank 0's tensors go straight to
        ``into`` and ``place``): call on every rank, after :func:`announce`.
        """
        meta = self.meta
        group = self.group
        distributed = is_distributed()
        rank = dist.get_rank(group) if distributed else 0
        device = pg_device(group) if distributed else torch.device("cpu")
        leaves = self.leaves
        out = list(meta["values"])
        paths = self.paths() if place or into else []

        def destination(index: int, shape: tuple[int, ...], dtype: torch.dtype) -> Optional[torch.Tensor]:
            target = into(paths[index]) if into else None
            if target is None or target.shape != shape or target.dtype != dtype:
                return None
            if not target.is_contiguous() or target.is_inference():
                return None
            return target if target.device == (device if distributed else leaves[index].device) else None

        copy_to: list[torch.Tensor] = []
        copy_from: list[torch.Tensor] = []

        def land(index: int, tensor: torch.Tensor, target: Optional[torch.Tensor]) -> None:
            if target is not None and target.untyped_storage().data_ptr() == tensor.untyped_storage().data_ptr():
                if target.data_ptr() == tensor.data_ptr() and target.stride() == tensor.stride():
                    out[index] = target  # rank 0 sent the destination itself
                    return
                target = None  # another view of the destination's memory: not copied into itself
            if target is not None:
                copy_to.append(target)
                copy_from.append(tensor)
                out[index] = target
            else:
                out[index] = place(paths[index], tensor) if place else tensor

        def copy() -> None:  # one call for a bucket's tensors (each copy_ alone costs microseconds)
            if copy_to:
                torch._foreach_copy_(copy_to, copy_from)
                copy_to.clear()
                copy_from.clear()

        def own(index: int) -> torch.Tensor:
            leaf: torch.Tensor = leaves[index]
            return leaf.detach() if leaf.requires_grad else leaf

        with torch.no_grad():
            if not distributed:
                for index, shape, dtype in meta["tensors"]:
                    land(index, own(index), destination(index, shape, dtype))
                copy()
                return self._tree(out)

            # A failure while landing (in ``place``, or a copy) is raised only
            # once every bucket has moved: the other ranks wait for them.
            failures: list[Exception] = []

            def arrived(work: Any, bucket: list[Any], buffer: torch.Tensor, targets: list[Any]) -> None:
                work.wait()
                if failures:
                    return
                try:
                    if rank == 0 and all(leaves[index].device == buffer.device for index, _, _ in bucket):
                        # rank 0 keeps its own tensors: no views to make, and the buffer goes now
                        for (index, _, _), target in zip(bucket, targets):
                            land(index, own(index), target)
                    else:
                        views = [buffer] if len(bucket) == 1 else torch.split_with_sizes(buffer, [math.prod(s) for _, s, _ in bucket])
                        for (index, shape, _), view, target in zip(bucket, views, targets):
                            land(index, view if len(shape) == 1 else view.view(shape), target)
                    copy()
                except Exception as err:  # raised below, after the last bucket
                    failures.append(err)

            # Two buckets in flight, each at most half the budget: the next one is
            # packed (rank 0) or allocated while the previous one is on the wire.
            in_flight: list[tuple[Any, list[Any], torch.Tensor, list[Any]]] = []
            for bucket in _buckets(meta["tensors"], max(1, bucket_bytes // 2)):
                targets: list[Any] = [destination(*spec) for spec in bucket] if into else [None] * len(bucket)
                if rank == 0:
                    buffer = _pack([leaves[index] for index, _, _ in bucket], device)
                elif len(bucket) == 1:
                    buffer = targets[0] if targets[0] is not None else torch.empty(bucket[0][1], dtype=bucket[0][2], device=device)
                else:
                    buffer = torch.empty(sum(math.prod(shape) for _, shape, _ in bucket), dtype=bucket[0][2], device=device)
                in_flight.append((dist.broadcast(buffer, group=group, group_src=0, async_op=True), bucket, buffer, targets))
                del buffer
                if len(in_flight) == 2:
                    arrived(*in_flight.pop(0))
            while in_flight:
                arrived(*in_flight.pop(0))
            if failures:
                raise failures[0]
        # the buffers now live on only in the tensors ``place`` left as views of them
        return self._tree(out)


def announce(state_dict: Any, *, group: Optional[dist.ProcessGroup] = None) -> Announcement:
    """Broadcast what rank 0's ``state_dict`` holds (structure, keys, shapes,
    dtypes, non-tensor values) but no tensor data: the first half of
    :func:`broadcast_from_rank0`, so that a load can be planned and agreed
    on before any tensor moves.

    Collective: one metadata broadcast; the input of ranks other than 0 is
    ignored. A bad input on rank 0 (not a mapping, ShardedTensors) raises
    the same error on every rank. Outside a process group, this process is rank 0.

    Raises:
        NotAMappingError: rank 0's input is not a state dict it can send.
    """
    distributed = is_distributed()
    rank = dist.get_rank(group) if distributed else 0
    leaves: list[Any] = []
    meta: Any = None
    if rank == 0:
        leaves, meta = _describe(state_dict)
    if distributed:
        box = [meta]
        dist.broadcast_object_list(box, group=group, group_src=0)
        meta = box[0]
    if "error" in meta:
        raise NotAMappingError(f"broadcast_from_rank0: {meta['error']} (seen on rank {rank}).")
    return Announcement(meta, leaves, group)


def _pack(tensors: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    """One contiguous buffer on ``device``: the tensor itself when alone, else
    the tensors flattened side by side (one C++ concatenation)."""
    if len(tensors) == 1:
        return tensors[0].detach().to(device).contiguous()
    flat: torch.Tensor = torch._C._nn.flatten_dense_tensors(tensors)  # under no_grad: no graph
    return flat.to(device)


def broadcast_from_rank0(
    *,
    bucket_bytes: int = DEFAULT_BUCKET_BYTES,
    group: Optional[dist.ProcessGroup] = None,
    place: Optional[Callable[[tuple[Any, ...], torch.Tensor], Any]] = None,
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
    kept), so a rank that keeps only its shard (:func:`shard_as`) frees each
    bucket before the next. A bad input on rank 0 raises the same error on
    every rank. Outside a process group it returns its input.
    """
    return _BroadcastFromRank0(bucket_bytes, group, place)


# Values that are leaves of every tree: a dict of only these is sent as its keys.
_SCALARS = (torch.Tensor, int, float, str, type(None))


def _describe(state_dict: Any) -> tuple[list[Any], dict[str, Any]]:
    """Rank 0's leaves, and what the other ranks need to receive them: the
    structure, the non-tensor values, and each tensor's index, shape and
    dtype (or an error every rank raises).

    A dict of tensors and scalars, the usual state dict, travels as its list
    of keys: a tenth of the bytes of its treespec and a third of the time to
    encode and decode.
    """
    if not isinstance(state_dict, Mapping):  # every rank must learn of it, or the others hang
        return [], {"error": f"rank 0 holds a {type(state_dict).__name__}, expected a state dict (a Mapping)"}
    flat = type(state_dict) in (dict, OrderedDict)
    leaves = list(state_dict.values()) if flat else []
    if flat and not all(isinstance(leaf, _SCALARS) for leaf in leaves):
        flat = False
    if not flat:
        leaves, spec = tree_flatten(state_dict)
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
    if flat:
        structure = {"keys": list(state_dict), "ordered": type(state_dict) is OrderedDict}
    else:  # a treespec: no per-tensor placeholder objects to pickle
        structure = {"spec": spec}
    return leaves, {**structure, "values": values, "tensors": tensors}


def local_slice(full: torch.Tensor, template: Any) -> Optional[torch.Tensor]:
    """This rank's part of ``full`` as the DTensor ``template`` lays it out,
    as a view of ``full`` (no copy), for FSDP2's and DDP-like layouts (a 1-D
    mesh, ``Shard(0)`` or ``Replicate``, same shape and dtype); ``None`` for
    any other layout. Not a collective."""
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
        counts = _row_counts(full.shape[0], size)
        start = sum(counts[:rank])
        return full.detach()[start : start + counts[rank]]
    return None


_positions: weakref.WeakKeyDictionary[Any, tuple[int, int]] = weakref.WeakKeyDictionary()


def _position(mesh: Any) -> tuple[int, int]:
    """(size, this rank's coordinate) of a 1-D device mesh, remembered per
    mesh: this runs once per tensor of a load, and the mesh computes both."""
    position = _positions.get(mesh)
    if position is None:
        (rank,) = mesh.get_coordinate()
        position = _positions[mesh] = (mesh.size(), rank)
    return position


def shard_as(full: torch.Tensor, template: Any) -> Any:
    """The local shard of ``full`` laid out as the DTensor ``template`` is
    (mesh and placements, strided shards included), as a new DTensor that
    shares no memory with ``full``.

    Not a collective: every rank holds ``full`` and keeps its own slice.
    """
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


def is_dtensor(value: Any) -> bool:
    return isinstance(value, dtensor_type())


def _dtensors(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """The DTensor values of a flat state dict, by key."""
    dtensor = sys.modules.get("torch.distributed.tensor")
    if dtensor is None:
        return {}
    cls = dtensor.DTensor
    return {key: value for key, value in state_dict.items() if isinstance(value, cls)}


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


# -- the utilities with torch's signatures -------------------------------------


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
    from sdtree.transforms.tensors import _type_check, offload_to_cpu

    if type_check:
        _type_check("gather_state_dict", state_dict)
    out: dict[str, Any] = gather_dtensors(cpu_offload=cpu_offload)(state_dict)
    if cpu_offload:
        out = offload_to_cpu(bulk=False)(out)
    if ranks_only:
        out = keep_on_ranks(ranks_only, group=pg)(out)
    return out


def _place(full: torch.Tensor, local: Any, device: torch.device) -> Any:
    """``full`` laid out like ``local``: its shard of a DTensor (written into
    ``local`` when it has memory, as torch does), else the full tensor on ``device``."""
    if is_dtensor(local):
        if not local.is_meta:
            piece = local_slice(full, local)
            if piece is not None:  # FSDP2's and DDP-like layouts: one copy, straight into the shard
                with torch.no_grad():
                    local._local_tensor.copy_(piece)
                return local
        shard = shard_as(full.detach().to(device), local)
        if local.is_meta:
            return shard
        local.to_local().copy_(shard.to_local())
        return local
    return full.detach().to(device)


def distribute_state_dict(
    full_state_dict: dict[str, Any],
    local_state_dict: dict[str, Any],
    device: torch.device,
    pg: Optional[dist.ProcessGroup] = None,
) -> None:
    """Write ``full_state_dict`` (present on every rank) into
    ``local_state_dict`` as torch's ``_distribute_state_dict`` does: into the
    local shard of each DTensor, as tensors on ``device`` elsewhere, 0-dim
    tensors and other values as they are (0-dim on CPU).

    Unlike the transforms, this writes into ``local_state_dict``: that is
    its contract in torch. Not a collective: every rank slices its own shard.
    """
    for key, value in full_state_dict.items():
        if not isinstance(value, torch.Tensor):
            local_state_dict[key] = value
        elif value.dim() == 0:
            local_state_dict[key] = value.cpu()
        elif key in local_state_dict:
            local_state_dict[key] = _place(value, local_state_dict[key], device)


def distribute_tensors(
    local_state_dict: dict[str, Any],
    keys: list[str],
    device: torch.device,
    pg: Optional[dist.ProcessGroup] = None,
) -> None:
    """Replace each ``(local DTensor, full tensor)`` pair at ``keys`` of
    ``local_state_dict`` by the DTensor holding its part of the full tensor,
    as torch's ``_distribute_tensors`` does: written into the local DTensor's
    shard when it has memory (the same object comes back), a new DTensor
    when it is on the meta device. Keys whose value is absent, ``None`` or a
    tensor are left alone.

    Unlike the transforms, this writes into ``local_state_dict`` (torch's
    contract); every pair is checked before the first is written. Not a
    collective: every rank slices its own shard.

    Raises:
        TypeError: a value at ``keys`` is not such a pair.
        StructureMismatchError: a full tensor's shape differs from its DTensor's.
    """
    todo = []
    bad = []
    for key in keys:
        entry = local_state_dict.get(key)
        if entry is None or isinstance(entry, torch.Tensor):
            continue
        if not (
            isinstance(entry, (tuple, list))
            and len(entry) == 2
            and is_dtensor(entry[0])
            and isinstance(entry[1], torch.Tensor)
        ):
            raise TypeError(
                f"distribute_tensors: local_state_dict[{key!r}] must be a (local DTensor, full tensor) "
                f"pair, a tensor or None, got {_kind(entry)}."
            )
        local, full = entry
        if full.shape != local.shape:
            bad.append(f"{key!r}: full tensor {tuple(full.shape)} vs DTensor {tuple(local.shape)}")
        todo.append((key, local, full))
    if bad:
        raise StructureMismatchError(
            f"distribute_tensors: {len(bad)} full tensor(s) do not have the shape of their DTensor: "
            f"{_preview(bad, quote=False)}. Nothing was written."
        )
    for key, local, full in todo:
        local_state_dict[key] = _place(full, local, torch.device(device))


def _kind(value: Any) -> str:
    if isinstance(value, (tuple, list)):
        return f"a {type(value).__name__} of {', '.join(type(v).__name__ for v in value)}"
    return type(value).__name__


def broadcast_state_dict(
    full_state_dict: dict[str, Any],
    local_state_dict: dict[str, Any],
    device: torch.device,
    pg: Optional[dist.ProcessGroup] = None,
    strict: bool = False,
    cpu_offload: bool = False,
) -> None:
    """Broadcast rank 0's ``full_state_dict`` into every rank's
    ``local_state_dict``, as torch's ``_broadcast_state_dict`` does, but in
    buckets (see :func:`broadcast_from_rank0`): values land in the local shard
    of each DTensor, keys of ``local_state_dict`` that rank 0 lacks are
    dropped under ``strict``, and tensors move to CPU with ``cpu_offload``.

    Collective: call on every rank; ranks other than 0 may pass ``{}`` as
    ``full_state_dict``. Writes into ``local_state_dict`` (torch's contract).
    """
    templates = _dtensors(local_state_dict)

    def place(path: tuple[Any, ...], tensor: torch.Tensor) -> Any:
        if tensor.dim() == 0:  # torch sends these with the metadata: they land on CPU
            return tensor.cpu()
        # into the local shard as soon as the bucket arrives, as torch does
        local = templates.get(path[0]) if len(path) == 1 else None
        if local is not None:
            return _place(tensor, local, device)
        return tensor if tensor.device == device else tensor.to(device)

    # on CPU without templates every tensor stays as it arrives: no call per tensor
    as_arrived = not templates and device.type == "cpu" and pg_device(pg).type == "cpu"
    broadcast = broadcast_from_rank0(group=pg, place=None if as_arrived else place)
    received = broadcast(full_state_dict if dist.get_rank(pg) == 0 else {})
    for key, value in received.items():
        if key not in local_state_dict:
            continue
        if cpu_offload and isinstance(value, torch.Tensor):
            value = value.cpu()
        local_state_dict[key] = value
    if strict:
        for key in [k for k in local_state_dict if k not in received]:
            del local_state_dict[key]
