"""Process-group helpers, for the collective transforms, the adapters and
``sdtree.checkpoint`` alike: whether a group is up, this rank, the group's
device, tensors in buckets (two in flight), and :func:`agree`, which makes
every rank raise the same error when one rank's input is bad.

Outside a process group this process is rank 0 of 1, and nothing here
communicates. Functions that communicate say "Collective": every rank of
the group calls them, in the same order.
"""

from __future__ import annotations

import ctypes
import math
import pickle
import threading
import warnings
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Optional, TypeVar

import torch
import torch.distributed as dist

from sdtree._memory import empty
from sdtree.errors import SdtreeError

__all__ = [
    "DEFAULT_BUCKET_BYTES",
    "ALONE_BYTES",
    "Rows",
    "Spec",
    "all_gather_single",
    "is_distributed",
    "rank",
    "pg_device",
    "buckets",
    "two_in_flight",
    "scratch",
    "pack",
    "broadcast_buckets",
    "several_ranks",
    "agree",
    "portable_error",
    "first_error",
    "from_leader",
    "broadcast_object",
    "OBJECT_FIRST_BYTES",
]

T = TypeVar("T")
R = TypeVar("R")

# Two buckets of half this size are in flight in a gather or a broadcast: one
# on the wire while the other is packed or unpacked. 16 MiB measured best of
# 4 to 64 MiB on CPU/gloo (smaller buffers come back from the allocator
# without fresh page faults), and a collective of 8 MiB is already near the
# bandwidth of NCCL.
DEFAULT_BUCKET_BYTES = 16 * 1024 * 1024

# torch 2.13 renamed all_gather_into_tensor (and deprecated the old name);
# sdtree supports torch from 2.6.
all_gather_single: Callable[..., Any] = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def is_distributed() -> bool:
    """Whether a default process group is up."""
    return dist.is_available() and dist.is_initialized()


def several_ranks(group: Optional[dist.ProcessGroup] = None) -> bool:
    """Whether a process group of several ranks is up (so that the ranks must act together)."""
    return is_distributed() and dist.get_world_size(group) > 1


def rank(group: Optional[dist.ProcessGroup] = None) -> int:
    """This process's rank in ``group`` (0 outside a process group)."""
    return dist.get_rank(group) if is_distributed() else 0


def pg_device(group: Optional[dist.ProcessGroup] = None) -> torch.device:
    """The device the process group communicates on (CPU for gloo)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return dist.distributed_c10d._get_pg_default_device(group)


Spec = tuple[Any, Any, torch.dtype]  # (anything, shape, dtype)


def buckets(specs: Sequence[Spec], limit: int) -> list[list[Spec]]:
    """Split tensors (in order) into runs of one dtype of at most ``limit`` bytes
    each; a tensor larger than ``limit`` is a bucket of its own."""
    out: list[list[Spec]] = []
    size = 0
    for spec in specs:
        nbytes = math.prod(spec[1]) * spec[2].itemsize
        if not out or out[-1][0][2] != spec[2] or size + nbytes > limit:
            out.append([])
            size = 0
        out[-1].append(spec)
        size += nbytes
    return out


def two_in_flight(started: Iterable[Callable[[], None]]) -> None:
    """Finish the collectives of ``started``, keeping two in flight.

    Each item is what waits for one bucket's collective and unpacks it;
    drawing the item from ``started`` (a generator) starts that collective.
    So the next bucket is packed and sent while the previous one is on the
    wire, and at most two buckets' buffers are alive at once.
    """
    pending: Optional[Callable[[], None]] = None
    for finish in started:
        if pending is not None:
            pending()
        pending = finish
    if pending is not None:
        pending()


def _pack(tensors: list[torch.Tensor], device: torch.device, slot: int) -> torch.Tensor:
    """One contiguous buffer on ``device``: the tensor itself when alone (no
    copy when it is contiguous and on ``device``), else the tensors flattened
    side by side (one C++ concatenation, into this thread's scratch buffer
    ``slot`` on CPU)."""
    if len(tensors) == 1:
        return tensors[0].detach().to(device).contiguous()
    return pack(tensors, device, ("pack", slot))


class _Scratch(threading.local):
    def __init__(self) -> None:
        self.buffers: dict[Any, torch.Tensor] = {}


_scratch = _Scratch()


def scratch(numel: int, dtype: torch.dtype, slot: Any) -> torch.Tensor:
    """A CPU buffer of ``numel`` elements of ``dtype`` that this thread keeps
    under ``slot`` for the next call (grown when too small): memory to pack
    into or receive through, never handed out. Fresh CPU memory is faulted
    in page by page, which costs more than the copy itself (8 MiB: 4-7 ms
    fresh, 0.4 ms warm); each collective in flight uses its own slot."""
    nbytes = numel * dtype.itemsize
    buffer = _scratch.buffers.get(slot)
    if buffer is None or buffer.numel() < nbytes:
        buffer = _scratch.buffers[slot] = empty(nbytes, torch.uint8, torch.device("cpu"))
    return buffer[:nbytes].view(dtype)


def pack(tensors: Sequence[torch.Tensor], device: torch.device, slot: Any) -> torch.Tensor:
    """``tensors`` (of one dtype) flattened side by side, on ``device``: in
    this thread's scratch buffer ``slot`` when that is CPU and so are they
    (the result is overwritten by the next pack into ``slot``), else in new
    memory."""
    if device.type == "cpu":
        out = scratch(sum(map(torch.Tensor.numel, tensors)), tensors[0].dtype, slot)
        # one concatenation along dim 0 when the shapes agree past it (the
        # tensors as they are), else of the tensors flattened (a view each)
        into, parts = out, list(tensors)
        tail = parts[0].shape[1:]
        if tail and tail.numel() and all(t.shape[1:] == tail for t in parts):
            into = out.view(-1, *tail)
        elif not all(t.dim() == 1 for t in parts):
            parts = [t.reshape(-1) for t in parts]
        try:
            torch.cat(parts, out=into)
            return out
        except RuntimeError:  # some on another device (cheaper to find out so than to ask each)
            pass
    flat: torch.Tensor = torch._C._nn.flatten_dense_tensors(list(tensors))  # under no_grad: no graph
    return flat.to(device)


def _own(leaf: torch.Tensor) -> torch.Tensor:
    return leaf.detach() if leaf.requires_grad else leaf


# A tensor of at least this many bytes travels alone, as it is: packed with
# others it would cost a copy on every rank (and fresh bucket memory on the
# receivers) for a collective whose fixed cost is small against its transfer
# (on CPU/gloo a broadcast costs ~50us, 1 MiB ~300us on the wire).
ALONE_BYTES = 1024 * 1024

Rows = tuple[int, ...]  # rows of dim 0 each rank of the group keeps, by group rank


def broadcast_buckets(
    specs: Sequence[tuple[int, tuple[int, ...], torch.dtype]],
    sources: Sequence[Any],
    land: Callable[[list[tuple[int, torch.Tensor]]], None],
    *,
    bucket_bytes: int = DEFAULT_BUCKET_BYTES,
    group: Optional[dist.ProcessGroup] = None,
    receive_into: Optional[Callable[[int], Optional[torch.Tensor]]] = None,
    split: Optional[Callable[[int], Optional[Rows]]] = None,
) -> None:
    """Send rank 0's tensors ``sources[i]`` (``specs``: ``(i, shape, dtype)``,
    known to every rank) to every rank, two collectives in flight: a tensor
    of at least ``ALONE_BYTES`` (or more than ``bucket_bytes / 2``) alone
    and as it is, smaller ones in buckets of one dtype and at most
    ``bucket_bytes / 2``.

    ``split(i)``, when it gives the rows of dim 0 each rank keeps (by group
    rank, summing to the tensor's rows, the same on every rank), makes rank
    ``r`` receive only its rows ``[sum(rows[:r]), +rows[r])``: a tensor
    alone is scattered (each rank receives its rows, no more), a small one
    travels in its bucket and is cut to its rows.

    ``land`` gets each collective's ``(i, tensor)`` as it arrives (the
    rows only, for a split tensor): rank 0 its own tensors when they are on
    the group's device already, the other ranks the tensor received (a view
    of its bucket for small ones). A tensor alone is received straight into
    ``receive_into(i)`` when that gives a tensor (of its shape, or of its
    rows' shape when split, dtype, contiguous, on the group's device): no
    pack or unpack copy on any rank. An error in ``land`` is raised after
    the last collective, so that the other ranks do not wait forever.
    A split tensor's rows are in memory of their own (a copy, for a small
    one: never a view of a bucket or of rank 0's tensor).

    Collective: call on every rank (``sources`` matters on rank 0 only).
    Outside a process group ``land`` gets rank 0's tensors at once.
    """
    with torch.no_grad():
        if not is_distributed():
            land([(i, _own(sources[i])) for i, _, _ in specs])
            return
        this_rank = dist.get_rank(group)
        device = pg_device(group)
        failures: list[Exception] = []
        limit = max(1, bucket_bytes // 2)
        alone = min(ALONE_BYTES, limit)
        jobs: list[tuple[int, list[Spec], Optional[Rows]]] = []  # (position, tensors, rows when scattered)
        small: list[Spec] = []
        position: dict[int, int] = {}
        prod = math.prod
        for at, spec in enumerate(specs):
            if prod(spec[1]) * spec[2].itemsize >= alone:
                jobs.append((at, [spec], split(spec[0]) if split else None))
            else:
                position[spec[0]] = at
                small.append(spec)
        jobs.extend((position[bucket[0][0]], bucket, None) for bucket in buckets(small, limit))
        jobs.sort(key=lambda job: job[0])

        # rank 0: whether every tensor is on the group's device (one check, not one a bucket)
        on_device = this_rank == 0 and len({sources[i].device for i, _, _ in specs}) == 1 and bool(specs) and sources[specs[0][0]].device == device

        def landed(arrived: list[tuple[int, torch.Tensor]]) -> None:
            if failures:
                return
            try:
                land(arrived)
            except Exception as err:  # raised below, after the last collective
                failures.append(err)

        def start(job: int, bucket: list[Spec], rows: Optional[Rows]) -> Callable[[], None]:
            if rows is not None:
                return _scatter_rows(bucket[0], rows, sources, landed, this_rank, device, group, receive_into)
            if this_rank == 0:
                buffer = _pack([sources[i] for i, _, _ in bucket], device, job % 2)  # two in flight: two slots
            elif len(bucket) == 1:
                ((i, shape, dtype),) = bucket
                target = receive_into(i) if receive_into and not (split and split(i)) else None
                buffer = target if target is not None else empty(shape, dtype, device)
            else:
                buffer = empty(sum(math.prod(shape) for _, shape, _ in bucket), bucket[0][2], device)
            work = dist.broadcast(buffer, group=group, group_src=0, async_op=True)

            def arrived() -> None:
                work.wait()
                if this_rank == 0 and (on_device or all(sources[i].device == device for i, _, _ in bucket)):
                    # rank 0 keeps its own tensors: no views to make, and the buffer goes now
                    views = [_own(sources[i]) for i, _, _ in bucket]
                elif len(bucket) == 1:
                    views = [buffer]
                elif all(s == bucket[0][1] for _, s, _ in bucket):  # one shape: the views in one call
                    views = list(buffer.view(len(bucket), *bucket[0][1]).unbind(0))
                else:
                    flat = torch.split_with_sizes(buffer, [math.prod(s) for _, s, _ in bucket])
                    views = [view if len(shape) == 1 else view.view(shape) for (_, shape, _), view in zip(bucket, flat)]
                if split:  # a small split tensor: this rank's rows of it
                    for at, (i, _, _) in enumerate(bucket):
                        mine = split(i)
                        if mine is not None:
                            first = sum(mine[:this_rank])
                            views[at] = views[at][first : first + mine[this_rank]].clone()
                landed([(i, view) for (i, _, _), view in zip(bucket, views)])

            return arrived

        two_in_flight(start(job, bucket, rows) for job, (_, bucket, rows) in enumerate(jobs))
        if failures:
            raise failures[0]


def _scatter_rows(
    spec: Spec,
    rows: Rows,
    sources: Sequence[Any],
    landed: Callable[[list[tuple[int, torch.Tensor]]], None],
    this_rank: int,
    device: torch.device,
    group: Optional[dist.ProcessGroup],
    receive_into: Optional[Callable[[int], Optional[torch.Tensor]]],
) -> Callable[[], None]:
    """Start the scatter of rank 0's tensor ``spec`` by dim-0 ``rows``: each
    rank receives its rows (into ``receive_into`` when it holds as many
    rows as any rank: every piece is padded to the most rows), rank 0 sends
    views of its tensor (a copy for a padded piece only)."""
    i, shape, dtype = spec
    most = max(rows)
    mine = rows[this_rank]
    padded = (most, *shape[1:])
    target = receive_into(i) if receive_into else None
    buffer = target if target is not None and mine == most else empty(padded, dtype, device)
    pieces: Optional[list[torch.Tensor]] = None
    if this_rank == 0:
        full = sources[i].detach().to(device).contiguous()
        pieces = []
        first = 0
        for count in rows:
            piece = full[first : first + count]
            if count < most:
                piece = torch.cat([piece, piece.new_zeros((most - count, *shape[1:]))])
            pieces.append(piece)
            first += count
    work = dist.scatter(buffer, pieces, group=group, group_src=0, async_op=True)

    def arrived() -> None:
        work.wait()
        received = buffer[:mine] if buffer.shape[0] != mine else buffer
        if target is not None and received is not target:
            target.copy_(received)
            received = target
        landed([(i, received)])

    return arrived


def agree(
    step: Callable[[], T],
    *,
    catch: tuple[type[Exception], ...],
    report: Callable[[Exception], R],
    fail: Callable[[list[tuple[int, R]], int], Exception],
    group: Optional[dist.ProcessGroup] = None,
) -> T:
    """Run ``step`` and make every rank agree on the outcome: when ``step``
    raises one of ``catch`` on any rank, every rank raises
    ``fail([(rank, report(error)), ...], world_size)`` for the ranks that
    failed (``report`` makes what travels: picklable, small); else every rank
    returns its own result.

    One tiny all_reduce says whether any rank failed; only then do the ranks
    exchange their reports. Collective: call on every rank. Outside a process
    group ``step`` runs alone and its errors propagate as they are.
    """
    if not is_distributed():
        return step()
    result: Optional[T] = None
    problem: Optional[R] = None
    failed = False
    try:
        result = step()
    except catch as err:
        problem, failed = report(err), True
    flag = torch.tensor([failed], dtype=torch.int32, device=pg_device(group))
    dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=group)
    if not flag.item():
        return result  # type: ignore[return-value]  # no rank failed, so step() returned
    reports: list[Optional[tuple[bool, Optional[R]]]] = [None] * dist.get_world_size(group)
    dist.all_gather_object(reports, (failed, problem), group=group)
    bad = [(r, entry[1]) for r, entry in enumerate(reports) if entry is not None and entry[0]]
    raise fail(bad, len(reports))  # type: ignore[arg-type]  # a failed rank's report is set


def portable_error(err: Exception) -> tuple[type[Exception], str]:
    """``err`` as it can travel to the other ranks (a report for :func:`agree`):
    its type and message when it is sdtree's or an ``OSError``, else a
    ``RuntimeError`` naming it (any type may not unpickle elsewhere)."""
    if isinstance(err, (SdtreeError, OSError)):
        return type(err), str(err)
    return RuntimeError, f"{type(err).__name__}: {err}"


def first_error(bad: list[tuple[int, tuple[type[Exception], str]]], world: int) -> Exception:
    """What every rank raises (a ``fail`` for :func:`agree`): the first failing
    rank's error, of its type, saying which rank it was."""
    rank_, (kind, message) = bad[0]
    return kind(f"rank {rank_} of {world}: {message}")


# broadcast_object's first message: objects up to this size (a state dict's
# metadata, of a thousand tensors) travel in one collective, which on gloo
# costs what an 8-byte one does (~0.15 ms, against ~0.45 ms for
# broadcast_object_list's two collectives and tensor conversions)
OBJECT_FIRST_BYTES = 64 * 1024
_HEAD = 8  # the pickle's length, int64; negative: the sender could not pickle


def broadcast_object(obj: Any, *, src: int = 0, group: Optional[dist.ProcessGroup] = None) -> Any:
    """Group rank ``src``'s ``obj``, pickled, on every rank of ``group``: one
    broadcast of ``OBJECT_FIRST_BYTES`` when the pickle fits, a second for
    the rest when not. An object that does not pickle raises ``TypeError``
    on every rank (the other ranks do not wait forever).

    Collective: call on every rank (``obj`` matters on ``src`` only).
    """
    device = pg_device(group)
    sender = dist.get_rank(group) == src
    room = OBJECT_FIRST_BYTES - _HEAD
    first = scratch(OBJECT_FIRST_BYTES, torch.uint8, "object")  # CPU; warm after the first call
    payload = b""
    if sender:
        try:
            payload = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
            length = len(payload)
        except Exception as err:  # every rank must learn of it
            payload = f"broadcast of a {type(obj).__name__} failed to pickle on rank {src}: {err}".encode()
            length = -len(payload)
        head = length.to_bytes(_HEAD, "little", signed=True) + payload[:room]
        ctypes.memmove(first.data_ptr(), head, len(head))
    _broadcast_through(first, device, src, group)
    length = int.from_bytes(ctypes.string_at(first.data_ptr(), _HEAD), "little", signed=True)
    if not sender:
        payload = ctypes.string_at(first.data_ptr() + _HEAD, min(abs(length), room))
    rest = abs(length) - room
    if rest > 0:
        tail = torch.empty(rest, dtype=torch.uint8)
        if sender:
            ctypes.memmove(tail.data_ptr(), payload[room:], rest)
        _broadcast_through(tail, device, src, group)
        if not sender:
            payload += ctypes.string_at(tail.data_ptr(), rest)
    if length < 0:
        raise TypeError(payload.decode(errors="replace"))
    return obj if sender else pickle.loads(payload)


def _broadcast_through(buffer: torch.Tensor, device: torch.device, src: int, group: Optional[dist.ProcessGroup]) -> None:
    """Broadcast CPU ``buffer`` over a group whose device is ``device`` (a
    device copy there and back, where that is not CPU)."""
    if device.type == "cpu":
        dist.broadcast(buffer, group=group, group_src=src)
        return
    wire = buffer.to(device)
    dist.broadcast(wire, group=group, group_src=src)
    buffer.copy_(wire)


def from_leader(step: Callable[[], T], leader: int, group: Optional[dist.ProcessGroup] = None) -> T:
    """Run ``step`` on the ``leader`` rank only (a global rank); every rank
    returns its result, or raises its error (:func:`portable_error`).

    Collective: one object broadcast (:func:`broadcast_object`); call on every rank.
    """
    shared: Any = None
    if dist.get_rank() == leader:
        try:
            shared = ("ok", step())
        except Exception as err:  # any failure must reach the other ranks too, or they hang
            shared = ("error", portable_error(err))
    src = leader if group is None else dist.get_group_rank(group, leader)
    status, value = broadcast_object(shared, src=src, group=group)
    if status == "error":
        kind, message = value
        raise kind(message)
    result: T = value
    return result

