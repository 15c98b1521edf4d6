"""Staging for async checkpoints: :class:`Stager`, a persistent CPU mirror of a
state dict that each checkpoint copies into, so that training goes on while
the mirror is saved.

The mirror is built once and keeps the state dict's structure: DTensors stay
DTensors (same mesh, placements, shape and stride) over CPU local tensors,
ShardedTensors keep their metadata over CPU shards, and tensors that share
storage in the source (tied weights, views of one buffer) share storage in
the mirror and are copied once. Each :meth:`Stager.stage` checks the state
dict it is given against the layout the mirror was built for (one small
tuple per leaf) and copies from the tensors it is given, never from tensors
remembered from an earlier call: a hook that makes new tensors each call
(torchtitan#3675) is staged like any other. It writes only the mirror.
"""

from __future__ import annotations

import concurrent.futures
from collections.abc import Mapping
from typing import Any, Optional, Union

import torch

from sdtree._collectives import agree, first_error, portable_error, several_ranks
from sdtree._tree import codify, tree_flatten_keyed, tree_unflatten
from sdtree.errors import StagerClosedError, StagingMismatchError, UnsupportedLeafError, preview
from sdtree.transforms.gather import GatherPlan
from sdtree.transforms.tensors import allocate, dtensor_type, local_tensors, path_differences, rewrap, sharded_tensor_type

__all__ = ["Stager"]

StateDict = dict[str, Any]

# A span of shared storage sits in the mirror at the same offset modulo this
# many bytes as in the source, so a view of any dtype stays aligned.
_ALIGN = 16
_PLAIN = (torch.Tensor, torch.nn.Parameter)
_TENSOR, _DTENSOR, _SHARDED = 0, 1, 2  # how a leaf holds its local tensors


def _signature(leaf: Any, dtensor_cls: Any, sharded_cls: Any) -> Optional[tuple[Any, ...]]:
    """What a leaf must keep for the mirror to fit it: None for a non-tensor;
    shape, dtype and device; and for sharded tensors the sharding and the
    local shapes. (The classes are :func:`dtensor_type` and
    :func:`sharded_tensor_type`, looked up once per call of the caller.)"""
    cls = type(leaf)
    if cls in _PLAIN:
        return (leaf.shape, leaf.dtype, leaf.device)
    if isinstance(leaf, dtensor_cls):
        spec, local = leaf._spec, leaf._local_tensor  # not the public properties: this runs once per leaf per stage
        return ("DTensor", spec.tensor_meta, spec.mesh, spec.placements, local.shape, local.device)
    if isinstance(leaf, sharded_cls):
        shards = tuple((tuple(s.metadata.shard_offsets), s.tensor.shape, s.tensor.device) for s in leaf.local_shards())
        return ("ShardedTensor", *_shape_and_dtype(leaf), shards)
    if isinstance(leaf, torch.Tensor):
        return (leaf.shape, leaf.dtype, leaf.device)
    return None


def _signatures(leaves: list[Any]) -> list[Optional[tuple[Any, ...]]]:
    dtensor_cls, sharded_cls = dtensor_type(), sharded_tensor_type()
    return [_signature(leaf, dtensor_cls, sharded_cls) for leaf in leaves]


def _shape_and_dtype(leaf: Any) -> tuple[torch.Size, torch.dtype]:
    """A tensor's (global) shape and dtype; a ShardedTensor's from its metadata
    (its tensor attributes warn that ShardedTensor is deprecated)."""
    if isinstance(leaf, sharded_tensor_type()):
        meta = leaf.metadata()
        return torch.Size(meta.size), meta.tensor_properties.dtype
    return leaf.shape, leaf.dtype


def _render(sig: Optional[tuple[Any, ...]]) -> str:
    if sig is None:
        return "a non-tensor value"
    if sig[0] == "DTensor":
        _, meta, mesh, placements, local, device = sig
        return (
            f"DTensor{tuple(meta.shape)} {meta.dtype} [{', '.join(map(repr, placements))}] on {mesh!r} "
            f"with local {tuple(local)} on {device}"
        )
    if sig[0] == "ShardedTensor":
        _, shape, dtype, shards = sig
        return f"ShardedTensor{tuple(shape)} {dtype} with local shards {[(o, tuple(s)) for o, s, _ in shards]}"
    shape, dtype, device = sig
    return f"tensor{tuple(shape)} {dtype} on {device}"


def _byte_range(tensor: torch.Tensor) -> tuple[int, int]:
    """The bytes of its storage ``tensor`` reaches: [start, end)."""
    size = tensor.element_size()
    start = int(tensor.storage_offset()) * size
    extent = 1 + sum((n - 1) * s for n, s in zip(tensor.shape, tensor.stride()))
    return start, start + extent * size


def _bytes_of(storage: Any, start: int, nbytes: int, device: torch.device) -> torch.Tensor:
    """A uint8 view of ``nbytes`` of ``storage`` from byte ``start``."""
    return torch.empty(0, dtype=torch.uint8, device=device).set_(storage, start, (nbytes,), (1,))


class _Span:
    """Tensors that share one source storage, copied as one byte range."""

    def __init__(self, members: list[tuple[int, int, tuple[int, ...]]], start: int, mirror: torch.Tensor) -> None:
        self.members = members  # (local position, byte offset from the first member, stride)
        self.start = start  # of the range, in bytes from the first member
        self.nbytes = mirror.numel()
        self.mirror = mirror  # the range in the mirror (uint8)


class Stager:
    """A persistent CPU mirror of a state dict, for async checkpoints.

    Build it once; call :meth:`stage` at every checkpoint: it copies the
    state dict it is given into the mirror and returns the mirror. On CPU
    the copy is done when ``stage`` returns; from CUDA (``non_blocking``)
    it is in flight, and ``stage`` returns a ``concurrent.futures.Future``
    of the mirror, done when the copy has landed (:meth:`wait` blocks until
    then and returns the mirror). Later work on the current CUDA stream
    runs after the copy, so training may go on at once. Before staging again,
    finish the save that reads the mirror: ``stage`` overwrites it.

    It implements torch's ``AsyncStager`` protocol::

        stager = sdtree.Stager(state_dict)
        future = dcp.async_save(state_dict, checkpoint_id=path, async_stager=stager)

    saves the mirror as it was at the call, whatever training does next.

    Args:
        state_dict: what the mirror is built for (model, optimizer, nested
            dicts, DTensors, ShardedTensors; non-tensor leaves are carried
            through ``stage`` as they are, not copied). Its values are not
            read, and it is not kept.
        full_state_dict: mirror each DTensor and ShardedTensor as its full
            tensor on every rank; ``stage`` gathers straight into the
            mirror's buffers. Then ``stage`` is collective.
        pin_memory: pin the mirror (default: where CUDA is available; pinning
            takes effect only there).
        share_memory: put the mirror in shared memory (for a saving process).
        non_blocking: copy from CUDA without waiting (False: ``stage``
            waits and returns the mirror itself).
        rebuild: when ``stage`` is given a state dict of another layout,
            build a new mirror for it instead of raising.

    Raises:
        UnsupportedLeafError: a meta, sparse or quantized tensor (no strided
            data to copy).
    """

    # torch's AsyncStager protocol: async_save calls synchronize_staging() after a stage() that returned the mirror
    _synchronize_after_execute: bool = True

    def __init__(
        self,
        state_dict: Mapping[str, Any],
        *,
        full_state_dict: bool = False,
        pin_memory: Optional[bool] = None,
        share_memory: bool = False,
        non_blocking: bool = True,
        rebuild: bool = False,
    ) -> None:
        self.full_state_dict = full_state_dict
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory
        self.share_memory = share_memory
        self.non_blocking = non_blocking
        self.rebuild = rebuild
        self._events: list[Any] = []  # CUDA events of the copies in flight
        self._executor: Optional[concurrent.futures.ThreadPoolExecutor] = None
        self._closed = False
        # the layout the mirror was built for, and the plan of each stage (set by _build)
        self._spec: Any = None
        self._paths: list[Any] = []
        self._sigs: list[Optional[tuple[Any, ...]]] = []
        self._owner: list[int] = []  # the leaf of each local tensor
        self._kinds: list[tuple[int, int]] = []  # (leaf, kind) of the leaves copied by local tensor, in order
        self._mirror: list[Any] = []  # per leaf: its mirror, None for a non-tensor
        self._copies: dict[tuple[torch.device, torch.dtype], tuple[list[torch.Tensor], list[int]]] = {}
        self._tied: list[list[int]] = []
        self._spans: list[_Span] = []
        self._gathers: list[tuple[int, torch.Tensor]] = []  # (leaf, full tensor) with full_state_dict
        self._gather_plan: Optional[GatherPlan] = None  # how they are gathered, planned at the first stage
        self._nbytes = 0
        self._last: StateDict = {}
        self._build(state_dict)

    # -- the protocol ----------------------------------------------------------

    @property
    def should_synchronize_after_execute(self) -> bool:
        """Whether ``dcp.async_save`` calls :meth:`synchronize_staging` (it does: a no-op once staged)."""
        return self._synchronize_after_execute

    def synchronize_staging(self) -> None:
        """Wait until the last :meth:`stage` has landed in the mirror (torch's protocol)."""
        self.wait()

    def close(self) -> None:
        """Wait for copies in flight and release the mirror; the stager cannot stage after this."""
        if self._closed:
            return
        self.wait()
        if self._executor is not None:
            self._executor.shutdown(wait=True)
        self._closed = True
        self._mirror = []
        self._spans = []
        self._copies = {}
        self._gathers = []
        self._gather_plan = None
        self._last = {}

    @property
    def bytes_per_stage(self) -> int:
        """How many bytes one :meth:`stage` copies (tied weights and views once)."""
        return self._nbytes

    def wait(self) -> StateDict:
        """Block until the last :meth:`stage` has landed; return the mirror."""
        events, self._events = self._events, []
        for event in events:
            event.synchronize()
        return self._last

    @torch.no_grad()
    def stage(self, state_dict: Mapping[str, Any]) -> Union[StateDict, concurrent.futures.Future[StateDict]]:
        """Copy ``state_dict`` into the mirror; return the mirror (a future of
        it while a copy from CUDA is in flight).

        Every leaf is checked before anything is copied, so a mismatch
        leaves the mirror as it was. Collective with ``full_state_dict``:
        call on every rank.

        Raises:
            StagingMismatchError: ``state_dict`` has other keys, shapes,
                dtypes, devices, sharding or shared storage than the
                mirror's (unless ``rebuild``); on every rank with
                ``full_state_dict``.
            StagerClosedError: after :meth:`close`.
        """
        if self._closed:
            raise StagerClosedError("Stager.stage: the stager was closed. Build a new Stager(state_dict).")
        self.wait()  # the previous copy lands before the mirror is written again
        try:
            leaves, sources = self._checked(state_dict)
        except StagingMismatchError:
            if not self.rebuild:
                raise
            self._build(state_dict)
            leaves, sources = self._checked(state_dict)
        self._copy(leaves, sources)
        self._last = self._unflatten(leaves)
        if not self._events:
            return self._last
        if not self.non_blocking:
            return self.wait()
        if self._executor is None:
            self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="sdtree-stager")
        events, mirror = list(self._events), self._last

        def landed() -> StateDict:
            for event in events:
                event.synchronize()
            return mirror

        return self._executor.submit(landed)

    # -- building the mirror ---------------------------------------------------

    def _build(self, state_dict: Mapping[str, Any]) -> None:
        paths, leaves, self._spec = tree_flatten_keyed(state_dict)
        self._paths = paths
        self._sigs = _signatures(leaves)
        wrapped = (dtensor_type(), sharded_tensor_type())
        local: list[torch.Tensor] = []  # every local tensor copied by position, in leaf order
        owner: list[int] = []
        gathered: list[int] = []
        replicated: set[int] = set()  # full_state_dict: DTensors whose local tensor is the full tensor
        self._kinds = []
        for i, (leaf, sig) in enumerate(zip(leaves, self._sigs)):
            if sig is None:
                continue
            if self.full_state_dict and isinstance(leaf, wrapped):
                if isinstance(leaf, dtensor_type()) and all(p.is_replicate() for p in leaf._spec.placements):
                    replicated.add(i)
                else:
                    gathered.append(i)
                    continue
            parts = local_tensors(leaf) or []
            self._kinds.append((i, _DTENSOR if isinstance(leaf, wrapped[0]) else _SHARDED if isinstance(leaf, wrapped[1]) else _TENSOR))
            local.extend(parts)
            owner.extend([i] * len(parts))
        self._check_supported(paths, leaves, local, owner, gathered)
        self._owner = owner
        mirror_local = self._plan_copies(local)
        self._mirror = [None] * len(leaves)
        by_leaf: dict[int, list[torch.Tensor]] = {}
        for i, tensor in zip(owner, mirror_local):
            by_leaf.setdefault(i, []).append(tensor)
        for i, tensors in by_leaf.items():
            self._mirror[i] = tensors[0] if i in replicated else rewrap(leaves[i], tensors)
        for i in (i for i, leaf in enumerate(leaves) if isinstance(leaf, sharded_tensor_type()) and i not in by_leaf):
            if not self.full_state_dict:
                self._mirror[i] = rewrap(leaves[i], [])  # no local shard: metadata only
        self._gathers = self._plan_gathers(leaves, gathered)
        self._gather_plan = None
        self._nbytes += sum(full.numel() * full.element_size() for _, full in self._gathers)
        self._last = self._unflatten(leaves)

    def _unflatten(self, leaves: list[Any]) -> StateDict:
        """The mirror, with ``leaves``' non-tensor values."""
        mirror: StateDict = tree_unflatten(self._spec, [m if m is not None else v for m, v in zip(self._mirror, leaves)])
        return mirror

    def _check_supported(
        self, paths: list[Any], leaves: list[Any], local: list[torch.Tensor], owner: list[int], gathered: list[int]
    ) -> None:
        bad = {owner[k] for k, t in enumerate(local) if t.is_meta or t.layout != torch.strided or t.is_quantized}
        bad.update(i for i in gathered if isinstance(leaves[i], dtensor_type()) and leaves[i]._local_tensor.is_meta)
        if bad:
            shown = [codify(paths[i]) for i in sorted(bad)]
            raise UnsupportedLeafError(
                f"Stager: {len(shown)} tensor(s) hold no strided data to copy (meta, sparse or quantized): "
                f"{preview(shown, quote=False)}. Materialise them, or drop them from the state dict first."
            )

    def _plan_copies(self, local: list[torch.Tensor]) -> list[torch.Tensor]:
        """Group the local tensors by source storage; allocate the mirror:
        one tensor per distinct tensor alone in its storage, one byte range
        per storage that several distinct views share. Return each local
        tensor's mirror."""
        by_storage: dict[tuple[torch.device, int], list[int]] = {}
        singles: list[list[int]] = []  # positions of one tensor (several when tied)
        span_groups: list[list[int]] = []
        for k, tensor in enumerate(local):
            if tensor.numel() == 0:
                singles.append([k])
            else:
                by_storage.setdefault((tensor.device, tensor.untyped_storage().data_ptr()), []).append(k)
        for positions in by_storage.values():
            views: dict[tuple[Any, ...], list[int]] = {}
            for k in positions:
                t = local[k]
                views.setdefault((t.storage_offset(), t.shape, t.stride(), t.dtype), []).append(k)
            if len(views) == 1:
                singles.append(positions)
            else:
                span_groups.append(positions)
        mirror: list[Optional[torch.Tensor]] = [None] * len(local)
        allocated = allocate([(local[g[0]].shape, local[g[0]].dtype) for g in singles], pin_memory=self._pinned(), share_memory=self.share_memory)
        self._copies = {}
        self._tied = [g for g in singles if len(g) > 1]
        self._nbytes = 0
        for group, tensor in zip(singles, allocated):
            source = local[group[0]]
            dsts, positions = self._copies.setdefault((source.device, source.dtype), ([], []))
            dsts.append(tensor)
            positions.append(group[0])
            self._nbytes += tensor.numel() * tensor.element_size()
            for k in group:
                mirror[k] = tensor
        self._spans = self._plan_spans(local, span_groups, mirror)
        return mirror  # type: ignore[return-value]  # every position is set above

    def _plan_spans(
        self, local: list[torch.Tensor], groups: list[list[int]], mirror: list[Optional[torch.Tensor]]
    ) -> list[_Span]:
        ranges = [[_byte_range(local[k]) for k in positions] for positions in groups]
        layout: list[tuple[int, int, int, int]] = []  # (first, start, end, pad) per span
        for positions, reach in zip(groups, ranges):
            start, end = min(r[0] for r in reach), max(r[1] for r in reach)
            layout.append((reach[0][0], start, end, start % _ALIGN))
        sizes = [-(-(pad + end - start) // _ALIGN) * _ALIGN for _, start, end, pad in layout]
        if not groups:
            return []
        (buffer,) = allocate([(torch.Size((sum(sizes),)), torch.uint8)], pin_memory=self._pinned(), share_memory=self.share_memory)
        spans: list[_Span] = []
        base = 0
        for positions, reach, (first, start, end, pad), size in zip(groups, ranges, layout, sizes):
            members = [(k, r[0] - first, tuple(local[k].stride())) for k, r in zip(positions, reach)]
            spans.append(_Span(members, start - first, buffer[base + pad : base + pad + end - start]))
            self._nbytes += end - start
            first_in_mirror = base + pad + first - start  # where the first member's byte 0 lands
            for k, offset, stride in members:
                t = local[k]
                mirror[k] = buffer.view(t.dtype).as_strided(t.shape, stride, (first_in_mirror + offset) // t.element_size())
            base += size
        return spans

    def _plan_gathers(self, leaves: list[Any], gathered: list[int]) -> list[tuple[int, torch.Tensor]]:
        """``(leaf, full tensor)`` of each leaf staged in full: the mirror's
        buffers, which a :class:`~sdtree.transforms.gather.GatherPlan` fills."""
        specs = [_shape_and_dtype(leaves[i]) for i in gathered]
        fulls = allocate(specs, pin_memory=self._pinned(), share_memory=self.share_memory) if specs else []
        for i, full in zip(gathered, fulls):
            self._mirror[i] = full
        return list(zip(gathered, fulls))

    def _pinned(self) -> bool:
        return self.pin_memory and torch.cuda.is_available()

    # -- each stage ------------------------------------------------------------

    def _checked(self, state_dict: Mapping[str, Any]) -> tuple[list[Any], list[torch.Tensor]]:
        """The leaves of ``state_dict`` and its local tensors by position, once
        they fit the mirror (on every rank, with ``full_state_dict``)."""
        if self.full_state_dict and several_ranks():
            return agree(lambda: self._check(state_dict), catch=(StagingMismatchError,), report=portable_error, fail=first_error)
        return self._check(state_dict)

    def _check(self, state_dict: Mapping[str, Any]) -> tuple[list[Any], list[torch.Tensor]]:
        paths, leaves, spec = tree_flatten_keyed(state_dict)
        if spec != self._spec:
            self._raise_structure(paths)
        sigs = self._sigs
        found_sigs = _signatures(leaves)
        bad = [i for i, (found, sig) in enumerate(zip(found_sigs, sigs)) if found != sig]
        if bad:
            found = [f"{codify(paths[i])}: expected {_render(sigs[i])}, found {_render(found_sigs[i])}" for i in bad]
            self._fail(f"{len(bad)} of {len(leaves)} value(s) do not fit the mirror: {preview(found, quote=False)}")
        sources: list[torch.Tensor] = []
        for i, kind in self._kinds:
            leaf = leaves[i]
            if kind == _TENSOR:
                sources.append(leaf)
            elif kind == _DTENSOR:
                sources.append(leaf._local_tensor)
            else:
                sources.extend(s.tensor for s in leaf.local_shards())
        self._check_sharing(sources)
        return leaves, sources

    def _check_sharing(self, sources: list[torch.Tensor]) -> None:
        """Tensors that shared storage when the mirror was built still do, the same way."""
        bad: list[tuple[int, int]] = []  # (position, the position it shared storage with)
        for group in self._tied:
            first = sources[group[0]]
            bad.extend(
                (k, group[0]) for k in group[1:] if sources[k].data_ptr() != first.data_ptr() or sources[k].stride() != first.stride()
            )
        for span in self._spans:
            k0 = span.members[0][0]
            first = sources[k0]
            ptr, origin = first.untyped_storage().data_ptr(), first.storage_offset() * first.element_size()
            for k, offset, stride in span.members:
                t = sources[k]
                if (
                    t.untyped_storage().data_ptr() != ptr
                    or t.storage_offset() * t.element_size() - origin != offset
                    or t.stride() != stride
                ):
                    bad.append((k, k0))
        if bad:
            paths = [codify(self._paths[i]) for i in self._owner]
            shown = [f"{paths[k]} with {paths[k0]}" for k, k0 in bad]
            self._fail(
                f"{len(bad)} tensor(s) no longer share storage as they did when the mirror was built (tied "
                f"weights, views of one tensor), or share it at other offsets or strides: {preview(shown, quote=False)}"
            )

    def _raise_structure(self, paths: list[Any]) -> None:
        parts = path_differences(
            [codify(p) for p in self._paths], [codify(p) for p in paths], missing="of the mirror missing", extra="path(s) the mirror lacks"
        )
        self._fail("the state dict differs in structure from the mirror's; " + ("; ".join(parts) or "the containers differ in type"))

    def _fail(self, problem: str) -> None:
        raise StagingMismatchError(
            f"Stager.stage: {problem}. Build a new Stager(state_dict) for this state dict, or pass rebuild=True "
            "to Stager to rebuild the mirror when the layout changes. Nothing was staged."
        )

    def _copy(self, leaves: list[Any], sources: list[torch.Tensor]) -> None:
        devices: set[torch.device] = set()
        for (device, _), (dsts, positions) in self._copies.items():
            cuda = device.type == "cuda"
            torch._foreach_copy_(dsts, [sources[k] for k in positions], non_blocking=cuda and self.non_blocking)
            if cuda:
                devices.add(device)
        for span in self._spans:
            first = sources[span.members[0][0]]
            origin = int(first.storage_offset()) * first.element_size()
            source = _bytes_of(first.untyped_storage(), origin + span.start, span.nbytes, first.device)
            span.mirror.copy_(source, non_blocking=first.is_cuda and self.non_blocking)
            if first.device.type == "cuda":
                devices.add(first.device)
        self._gather(leaves)
        for device in sorted(devices, key=str):  # one event per device, on its current stream
            event = torch.cuda.Event()  # type: ignore[no-untyped-call]
            event.record(torch.cuda.current_stream(device))
            self._events.append(event)

    def _gather(self, leaves: list[Any]) -> None:
        """Fill the full tensors of ``full_state_dict`` (collective: every rank
        gathers the same leaves, in leaf order, checked against the mirror's
        layout on every rank first), reusing their memory and the plan of
        the gathers, made at the first stage."""
        if not self._gathers:
            return
        sharded = [leaves[i] for i, _ in self._gathers]
        if self._gather_plan is None:
            self._gather_plan = GatherPlan(sharded, [full for _, full in self._gathers])
        self._gather_plan(sharded)
