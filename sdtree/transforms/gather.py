"""Gather sharded tensors into full tensors, and keep a result on some ranks only.

``gather_dtensors`` replaces every DTensor (and FSDP1's legacy
``ShardedTensor``) by its full tensor, in buckets; ``gather_into`` gathers
them into the tensors of a destination you hold (a CPU mirror), reusing its
memory; ``keep_on_ranks`` gives ``{}`` on the other ranks (the
``ranks_only`` of torch's utilities).

Collective (``gather_dtensors``, ``gather_into``): call on every rank, with state dicts
holding the same DTensors in the same order. Inputs are never written
(``gather_into`` writes into its destination's tensors only).
"""

from __future__ import annotations

import math
import sys
import weakref
from collections.abc import Callable
from typing import Any, Optional

import attrs
import torch
import torch.distributed as dist

from sdtree._collectives import (
    ALONE_BYTES,
    DEFAULT_BUCKET_BYTES,
    Spec,
    agree,
    all_gather_single,
    buckets,
    first_error,
    pack,
    pg_device,
    portable_error,
    rank,
    scratch,
    two_in_flight,
)
from sdtree._memory import empty
from sdtree._tree import codify, tree_flatten, tree_unflatten
from sdtree.errors import SdtreeError, StructureMismatchError, preview
from sdtree.transforms.compose import Transform
from sdtree.transforms.sharding import row_counts
from sdtree.transforms.tensors import check_leaf_types, dtensor_type, offload_to_cpu, pair_leaves, sharded_tensor_type

__all__ = ["gather_dtensors", "gather_into", "GatherPlan", "keep_on_ranks", "gather_state_dict"]


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
        _gather(leaves, self.bucket_bytes, self._done)
        return tree_unflatten(spec, leaves)

    def _done(self, full: torch.Tensor) -> torch.Tensor:
        return full.cpu() if self.cpu_offload else full


Outs = Optional[list[Optional[torch.Tensor]]]  # a destination per leaf (``gather_into``), or fresh tensors


def _gather(leaves: list[Any], bucket_bytes: int, done: Callable[[torch.Tensor], torch.Tensor]) -> None:
    """Replace each DTensor and ShardedTensor of ``leaves`` by its full
    tensor, a new one passed through ``done``."""
    # Two buckets (of half the budget each) in flight: the next one is packed
    # and the previous one unpacked while a gather is on the wire.
    singles, jobs = _sharded_jobs(leaves, max(1, bucket_bytes // 2))
    for i in singles:
        leaves[i] = done(_gather_one(leaves[i]))
    two_in_flight(_gather_bucket(leaves, None, specs, done, at % 2) for at, (_, specs) in enumerate(jobs))


def _sharded_jobs(leaves: list[Any], limit: int) -> tuple[list[int], list[tuple[bool, list[Spec]]]]:
    """How the sharded leaves of ``leaves`` are gathered, in the leaves'
    order (the same on every rank): the indices of those gathered one by one
    (ShardedTensors, DTensors of another layout than FSDP2's), and FSDP2's
    (dim 0 over a 1-D mesh) as jobs of ``(index, shape, dtype)``: ``(True,
    [spec])`` for a tensor of at least ``ALONE_BYTES`` (or ``limit``), alone
    (no pack, no unpack), ``(False, bucket)`` for the others, in buckets of
    one mesh and dtype of at most ``limit`` bytes."""
    dtensor: Any = sys.modules.get("torch.distributed.tensor")
    sharded_cls = sharded_tensor_type()
    singles: list[int] = []
    if dtensor is None and not sharded_cls:  # neither module loaded: nothing is sharded
        return singles, []
    dtensor_cls = dtensor.DTensor if dtensor is not None else ()
    batches: dict[tuple[int, torch.dtype], list[Spec]] = {}
    for i, leaf in enumerate(leaves):
        if isinstance(leaf, dtensor_cls):
            spec = leaf._spec  # not the public properties: this runs once per leaf
            if _fsdp_layout(spec.placements, dtensor.Shard):
                meta = spec.tensor_meta
                batches.setdefault((id(spec.mesh), meta.dtype), []).append((i, meta.shape, meta.dtype))
            else:
                singles.append(i)
        elif isinstance(leaf, sharded_cls):
            singles.append(i)
    alone = min(ALONE_BYTES, limit)
    jobs: list[tuple[bool, list[Spec]]] = []
    for specs in batches.values():  # dict order follows the leaves'
        small = []
        itemsize = specs[0][2].itemsize
        for spec in specs:
            if math.prod(spec[1]) * itemsize >= alone:
                jobs.append((True, [spec]))
            else:
                small.append(spec)
        jobs.extend((False, bucket) for bucket in buckets(small, limit))
    return singles, jobs


def _gather_one(leaf: Any, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The full tensor of a DTensor (its own collective) or of a
    ShardedTensor (assembled in ``out`` when it can be)."""
    return leaf.full_tensor() if isinstance(leaf, dtensor_type()) else _gather_sharded_tensor(leaf, out)


def _land(full: torch.Tensor, out: Optional[torch.Tensor], done: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """``full`` written into ``out`` (unless it is ``out``), else ``done(full)``."""
    if out is None:
        return done(full)
    if full is not out:
        out.copy_(full)
    return out


def _staging(out: Optional[torch.Tensor], numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A buffer of ``numel`` elements on ``device`` to gather ``out``'s data
    through: kept for the next gather into ``out`` when on CPU (fresh CPU
    memory is faulted in page by page, during the transfer), new elsewhere
    (a device's caching allocator reuses its blocks)."""
    if out is None or device.type != "cpu":
        return empty(numel, dtype, device)
    key = id(out)
    buffer = _staged.get(key)
    if buffer is None or buffer.numel() != numel or buffer.dtype != dtype or buffer.device != device:
        if buffer is None:
            weakref.finalize(out, _staged.pop, key, None)
        buffer = _staged[key] = empty(numel, dtype, device)
    return buffer


# staging buffers of gather_into's destinations, by id of the destination
# (dropped with it); not a WeakKeyDictionary: tensors compare elementwise
_staged: dict[int, torch.Tensor] = {}
# a destination viewed as (world, its rows' share), by id (dropped with it):
# a view costs microseconds, and the stager gathers into the same mirror again
_views: dict[int, torch.Tensor] = {}


def _by_rank(out: torch.Tensor, world: int) -> torch.Tensor:
    """Contiguous ``out`` as ``(world, numel / world)``, kept for the next call."""
    key = id(out)
    view = _views.get(key)
    if view is None or view.shape[0] != world or view.data_ptr() != out.data_ptr() or view.numel() != out.numel():
        if view is None:
            weakref.finalize(out, _views.pop, key, None)
        view = _views[key] = out.view(world, -1)
    return view


def _direct(out: Optional[torch.Tensor], device: torch.device) -> bool:
    """Whether a collective on ``device`` can write into ``out`` itself."""
    return out is not None and out.device == device and out.is_contiguous()


def _gather_bucket(
    leaves: list[Any], outs: Outs, specs: list[Spec], done: Callable[[torch.Tensor], torch.Tensor], slot: int
) -> Callable[[], None]:
    """Start one all_gather for the bucket (``specs``: ``(index, shape,
    dtype)`` of its leaves, DTensors sharded by dim 0 over one 1-D mesh);
    return what waits for it and puts the full tensors into ``leaves`` (and
    ``outs``). Evenly split tensors of one shape are packed side by side,
    so that a single transposing copy turns the gathered buffer into their
    full tensors, viewed out of it in one call (or one copy per tensor into
    its destination); a bucket of one even tensor gathers straight into its
    full tensor (its destination, when contiguous and on the shards'
    device)."""
    first = leaves[specs[0][0]]
    group = first.device_mesh.get_group()
    world = dist.get_world_size(group)
    even: dict[torch.Size, list[int]] = {}  # shape -> tensors
    uneven = []
    # per shape: (shard length, None) when it splits evenly, else (row length, rows per rank)
    layouts: dict[torch.Size, tuple[int, Optional[tuple[int, ...]]]] = {}
    for i, shape, _ in specs:
        layout = layouts.get(shape)
        if layout is None:
            counts = row_counts(shape[0], world)
            row = math.prod(shape[1:])
            layout = layouts[shape] = (counts[0] * row, None) if counts.count(counts[0]) == world else (row, counts)
        length, uneven_counts = layout
        if uneven_counts is None:
            even.setdefault(shape, []).append(i)
        else:
            # every rank sends its rows padded to the most any rank holds
            uneven.append((i, uneven_counts, length, max(uneven_counts) * length))
    device = first._local_tensor.device
    alone = outs[specs[0][0]] if outs and len(specs) == 1 else None
    if len(specs) == 1 and even:
        i = specs[0][0]
        out = alone
        full = out if out is not None and _direct(out, device) else _staging(out, first.numel(), first.dtype, device).view(first.shape)
        work = all_gather_single(full, leaves[i]._local_tensor.contiguous(), group=group, async_op=True)

        def finish_one() -> None:
            work.wait()
            leaves[i] = _land(full, out, done)

        return finish_one
    pieces: list[torch.Tensor] = []
    for group_indices in even.values():
        pieces.extend(leaves[i]._local_tensor for i in group_indices)
    for i, _, _, width in uneven:
        local = leaves[i]._local_tensor.reshape(-1)
        pieces.append(local)
        if local.numel() < width:
            pieces.append(local.new_zeros(width - local.numel()))
    send = pack(pieces, device, ("send", slot)) if len(pieces) > 1 else pieces[0].reshape(-1)
    size = send.numel()
    if not even and len(uneven) == 1:  # a tensor alone (uneven): its full tensor is the prefix of what is gathered
        recv = _staging(alone, world * size, first.dtype, device).view(world, size)
    else:  # copied out of it when it arrives
        recv = (scratch(world * size, first.dtype, ("recv", slot)) if device.type == "cpu" else torch.empty(world * size, dtype=first.dtype, device=device)).view(world, size)
    work = all_gather_single(recv.view(-1), send, group=group, async_op=True)
    return lambda: _unpack(leaves, outs, work, recv, even, uneven, done)


def _unpack(
    leaves: list[Any],
    outs: Outs,
    work: Any,
    recv: torch.Tensor,
    even: dict[torch.Size, list[int]],  # shape -> tensors
    uneven: list[tuple[int, tuple[int, ...], int, int]],  # index, rows per rank, row length, padded width
    done: Callable[[torch.Tensor], torch.Tensor],
) -> None:
    work.wait()
    world = recv.shape[0]
    offset = 0
    copy_to: list[torch.Tensor] = []
    copy_from: list[torch.Tensor] = []
    for shape, group_indices in even.items():
        n, length = len(group_indices), math.prod(shape) // world
        gathered = recv[:, offset : offset + n * length].view(world, n, length)
        if outs:
            # rank-major as gathered -> each destination, one copy each (in one call)
            for i, source in zip(group_indices, gathered.unbind(1)):  # one call for the views
                out = outs[i]
                assert out is not None  # gather_into gives one for every sharded leaf
                if out.is_contiguous():
                    copy_to.append(_by_rank(out, world))
                    copy_from.append(source)
                else:
                    out.copy_(source.reshape(out.shape))
                leaves[i] = out
        else:
            # rank-major as gathered -> tensor-major: one copy, then the views in one call
            block = gathered.transpose(0, 1).contiguous()
            for i, full in zip(group_indices, block.view(n, *shape).unbind(0)):
                leaves[i] = done(full)
        offset += n * length
    for i, counts, row, width in uneven:
        out = outs[i] if outs else None
        shape = leaves[i].shape
        if not even and len(uneven) == 1:  # alone: the full tensor is the prefix
            leaves[i] = _land(recv.view(-1)[: math.prod(shape)].view(shape), out, done)
        elif _direct(out, recv.device):
            assert out is not None
            torch.cat([recv[r, offset : offset + counts[r] * row] for r in range(world)], out=out.view(-1))
            leaves[i] = out
        else:
            full = torch.cat([recv[r, offset : offset + counts[r] * row] for r in range(world)]).view(shape)
            leaves[i] = _land(full, out, done)
        offset += width
    if copy_to:
        torch._foreach_copy_(copy_to, copy_from)


def _gather_sharded_tensor(value: Any, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The full tensor of a legacy ``ShardedTensor`` (any shards, any number
    per rank), with one all-gather of each rank's shards packed flat, on the
    device of the local shards: assembled in ``out`` when it is on that device."""
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
    recv = empty(world * width, value.dtype, device)
    all_gather_single(recv, send, group=group)
    full = out if out is not None and out.device == device else empty(value.size(), value.dtype, device)
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
    while one is on the wire); a tensor of at least ``ALONE_BYTES`` (full
    size) is gathered alone, straight into its full tensor when it splits
    evenly; other layouts (2-D meshes, other dims, strided shards) and
    ShardedTensors one by one. With ``cpu_offload`` each full tensor moves
    to CPU as soon as it is assembled, so device memory stays near one bucket.

    Collective: call on every rank, with state dicts holding the same
    DTensors in the same order.
    """
    return _GatherDTensors(cpu_offload, bucket_bytes)


def gather_into(
    state_dict: Any,
    destination: Any,
    *,
    bucket_bytes: int = DEFAULT_BUCKET_BYTES,
    group: Optional[dist.ProcessGroup] = None,
) -> Any:
    """Gather every DTensor and ShardedTensor of ``state_dict`` straight into
    the full-size tensor at the same path of ``destination`` (a state dict of
    the same structure, paired by key: a CPU mirror, say), and return
    ``state_dict``'s structure with those destination tensors in place of
    the sharded leaves; every other leaf is ``state_dict``'s own, and is not
    copied.

    The gather is :func:`gather_dtensors`' (FSDP2's layout in buckets, two
    in flight; other layouts one by one) with no fresh full-size memory for
    FSDP2's layout: a tensor alone in its bucket that splits evenly is
    gathered into its destination itself when that is contiguous and on the
    shards' device; otherwise (uneven rows, another device, not contiguous)
    through a staging buffer kept with the destination for the next call
    when on CPU. Small tensors travel in buckets and are copied from the
    bucket into their destinations (one call per bucket). Other DTensor
    layouts and ShardedTensors are assembled in full and then copied.

    Every pair is checked before any tensor moves, and the ranks of ``group``
    (default: all) agree on the outcome, so a bad destination on one rank
    raises on every rank and writes nothing.

    Collective: call on every rank, with state dicts holding the same
    DTensors in the same order. Writes only into ``destination``'s tensors.

    Raises:
        StructureMismatchError: the structures differ, or a destination is
            not a plain tensor of its sharded leaf's full shape and dtype.
    """
    fn = "gather_into"
    sharded = (dtensor_type(), sharded_tensor_type())

    def check() -> tuple[list[Any], list[Optional[torch.Tensor]], Any]:
        paths, leaves, dests, spec = pair_leaves(fn, state_dict, destination)
        outs: list[Optional[torch.Tensor]] = [None] * len(leaves)
        bad = []
        for i, (path, leaf, out) in enumerate(zip(paths, leaves, dests)):
            if not isinstance(leaf, sharded):
                continue
            if not isinstance(out, torch.Tensor) or isinstance(out, sharded):
                bad.append(f"{codify(path)}: expected a tensor{tuple(leaf.shape)} {leaf.dtype}, found {type(out).__name__}")
            elif out.shape != leaf.shape or out.dtype != leaf.dtype:
                bad.append(f"{codify(path)}: expected tensor{tuple(leaf.shape)} {leaf.dtype}, found tensor{tuple(out.shape)} {out.dtype}")
            else:
                outs[i] = out
        if bad:
            raise StructureMismatchError(
                f"{fn}: {len(bad)} destination(s) cannot hold their full tensor: {preview(bad, quote=False)}. "
                "Allocate the destination with the full shape and dtype of each sharded tensor."
            )
        return leaves, outs, spec

    leaves, outs, spec = agree(check, catch=(SdtreeError,), report=portable_error, fail=first_error, group=group)
    GatherPlan(leaves, outs, bucket_bytes=bucket_bytes)(leaves)
    return tree_unflatten(spec, leaves)


class GatherPlan:
    """The gathers of :func:`gather_into` for one layout, planned once, for
    a destination gathered into again and again (the Stager's mirror with
    ``full_state_dict``): the buckets, the destination's views, and per
    bucket the plan of its copies are made here; each call packs, gathers
    and copies (through scratch memory this thread keeps, two buckets in
    flight), with no per-tensor planning left.

    ``GatherPlan(leaves, outs)`` plans the sharded leaves of ``leaves`` (a
    flat list) into the tensors ``outs`` (one per sharded leaf, of its full
    shape and dtype: :func:`gather_into` checks them); ``plan(leaves)``
    gathers leaves of that layout (the same sharding, shapes and dtypes, on
    every rank: the caller checks, as the Stager does) into them, replacing
    each sharded leaf of the list by its destination. It keeps no leaf, only
    the layout.

    Collective (the call): every rank, the same layout.
    """

    def __init__(self, leaves: list[Any], outs: list[Optional[torch.Tensor]], *, bucket_bytes: int = DEFAULT_BUCKET_BYTES) -> None:
        self._outs = outs
        self._bucket_bytes = bucket_bytes
        self._views: dict[int, tuple[Any, list[torch.Tensor]]] = {}  # per bucket: its views of the scratch it arrived in
        singles, jobs = _sharded_jobs(leaves, max(1, bucket_bytes // 2))
        # ("leaf", i) one by one, ("bucket", ...) packed, ("any", specs)
        self._jobs: list[tuple[Any, ...]] = [("leaf", i) for i in singles]
        self._jobs.extend(("any", specs) if alone else self._plan_bucket(leaves, specs) for alone, specs in jobs)
        self._planned = sorted(singles + [i for _, specs in jobs for i, _, _ in specs])  # every sharded leaf, in order
        self._layout = _layout([leaves[i] for i in self._planned])

    def _plan_bucket(self, leaves: list[Any], specs: list[Spec]) -> tuple[Any, ...]:
        """A bucket of tensors that split evenly into contiguous destinations:
        ("bucket", its leaves grouped by shard length, the (count, length) of
        each group, their local sizes, their destinations and those viewed
        by rank, in that order, the group and its size, the dtype, the
        device); any other: ("any", specs)."""
        first = leaves[specs[0][0]]
        group = first.device_mesh.get_group()
        world = dist.get_world_size(group)
        by_length: dict[int, list[int]] = {}
        for i, shape, _ in specs:
            out = self._outs[i]
            counts = row_counts(shape[0], world)
            if counts.count(counts[0]) != world or out is None or not out.is_contiguous():
                return ("any", specs)
            by_length.setdefault(counts[0] * math.prod(shape[1:]), []).append(i)
        order = [i for group_indices in by_length.values() for i in group_indices]
        lengths = [(len(group_indices), length) for length, group_indices in by_length.items()]
        numels = [leaves[i]._local_tensor.numel() for i in order]
        dests: list[torch.Tensor] = [self._outs[i] for i in order]  # type: ignore[misc]  # checked above
        by_rank = [out.view(world, -1) for out in dests]
        return ("bucket", order, lengths, numels, dests, by_rank, group, world, first.dtype, first._local_tensor.device)

    def __call__(self, leaves: list[Any]) -> None:
        if _layout([leaves[i] for i in self._planned]) != self._layout:
            raise StructureMismatchError(
                "GatherPlan: the sharded tensors are not of the layout the plan was made for. "
                "Check every rank's state dict first (the Stager does), or make a new plan."
            )
        with torch.no_grad():
            for kind, *job in self._jobs:
                if kind == "leaf":
                    (i,) = job
                    out = self._outs[i]
                    leaves[i] = _land(_gather_one(leaves[i], out), out, _never)
            two_in_flight(self._start(leaves, job, at) for at, job in enumerate(j for j in self._jobs if j[0] != "leaf"))

    def _start(self, leaves: list[Any], job: tuple[Any, ...], at: int) -> Callable[[], None]:
        slot = at % 2  # two in flight: two scratch slots
        if job[0] == "any":
            return _gather_bucket(leaves, self._outs, job[1], _never, slot)
        _, order, lengths, numels, dests, by_rank, group, world, dtype, device = job
        locals_ = [leaves[i]._local_tensor for i in order]
        if list(map(torch.Tensor.numel, locals_)) != numels:  # the same full shapes, sharded otherwise
            raise StructureMismatchError(
                "GatherPlan: the sharded tensors are not sharded as when the plan was made. "
                "Check every rank's state dict first (the Stager does), or make a new plan."
            )
        send = pack(locals_, device, ("send", slot))
        size = send.numel()
        recv = (scratch(world * size, dtype, ("recv", slot)) if device.type == "cpu" else torch.empty(world * size, dtype=dtype, device=device)).view(world, size)
        work = all_gather_single(recv.view(-1), send, group=group, async_op=True)

        def finish() -> None:
            work.wait()
            torch._foreach_copy_(by_rank, self._views_of(recv, lengths, at))  # rank-major as gathered -> each destination
            for i, out in zip(order, dests):
                leaves[i] = out

        return finish


    def _views_of(self, recv: torch.Tensor, lengths: list[tuple[int, int]], at: int) -> list[torch.Tensor]:
        """Each tensor's gathered rows in ``recv`` (world, size) of bucket
        ``at``, as (world, its shard length): kept while ``recv`` is the same
        scratch memory (at the next stage it usually is)."""
        key = (recv.data_ptr(), recv.shape)
        views = self._views.get(at)
        if views is None or views[0] != key:
            world, offset = recv.shape[0], 0
            made: list[torch.Tensor] = []
            for n, length in lengths:
                made.extend(recv[:, offset : offset + n * length].view(world, n, length).unbind(1))
                offset += n * length
            views = self._views[at] = (key, made)
        return views[1]


def _layout(leaves: list[Any]) -> list[Any]:
    """What a GatherPlan needs its sharded leaves to keep: a DTensor's full
    shape, stride and dtype (its spec's tensor meta, read without a call per
    leaf) and placements; a ShardedTensor's metadata."""
    dtensor_cls = dtensor_type()
    return [(leaf._spec.tensor_meta, leaf._spec.placements) if isinstance(leaf, dtensor_cls) else leaf.metadata() for leaf in leaves]


def _fsdp_layout(placements: Any, shard_cls: Any) -> bool:
    """Whether a DTensor's placements are FSDP2's: dim 0 over a 1-D mesh
    (a DTensor sharded by dim 0 has at least one dim)."""
    return len(placements) == 1 and type(placements[0]) is shard_cls and placements[0].dim == 0


def _never(full: torch.Tensor) -> torch.Tensor:
    raise AssertionError("gather_into gives every sharded leaf a destination")  # pragma: no cover


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
