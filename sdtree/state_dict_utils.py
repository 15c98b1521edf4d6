"""The utilities of ``torch.distributed._state_dict_utils`` that write into
their arguments, with torch's signatures: :func:`copy_state_dict` (into a
preallocated copy), :func:`distribute_state_dict` and
:func:`distribute_tensors` (full tensors into local shards),
:func:`broadcast_state_dict` (rank 0's state dict into every rank's), and
:func:`deliver_into`, the writing half of a broadcast (rank 0's tensors
straight into tensors you hold, after :func:`~sdtree.transforms.broadcast.announce`).

They are not transforms, and are not in :mod:`sdtree.transforms`: their
contract (torch's) is to write. Each checks everything it can before its
first write. The other utilities of torch's module, which write nothing,
sit beside the transforms they wrap: ``gather_state_dict`` in
:mod:`sdtree.transforms.gather`, ``offload_state_dict_to_cpu``,
``create_cpu_state_dict`` and ``check_state_dict_similarity`` in
:mod:`sdtree.transforms.tensors`, ``flatten_state_dict`` /
``unflatten_state_dict`` in :mod:`sdtree.transforms.nested`; all are at the
top level of :mod:`sdtree`.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping
from typing import Any, Optional

import torch
import torch.distributed as dist

from sdtree._collectives import DEFAULT_BUCKET_BYTES, pg_device
from sdtree._tree import codify, tree_unflatten
from sdtree.errors import StructureMismatchError, preview
from sdtree.transforms.broadcast import Announcement, Path, announce
from sdtree.transforms.sharding import local_slice, shard_as
from sdtree.transforms.tensors import check_leaf_types, dtensor_type, is_dtensor, local_tensors, pair_leaves, sharded_tensor_type

__all__ = [
    "copy_state_dict",
    "distribute_state_dict",
    "distribute_tensors",
    "broadcast_state_dict",
    "deliver_into",
]


@torch.no_grad()
def copy_state_dict(
    state_dict: dict[str, Any],
    copy_state_dict: dict[str, Any],
    non_blocking: bool = False,
    type_check: bool = True,
) -> dict[str, Any]:
    """Copy every tensor of ``state_dict`` into the matching tensor of
    ``copy_state_dict`` (torch's ``_copy_state_dict``), and return a state
    dict of the same structure holding ``copy_state_dict``'s tensors.

    A DTensor is copied into a DTensor (local tensor into local tensor), a
    ShardedTensor into a ShardedTensor (shard by shard), as torch does.
    Writes only ``copy_state_dict``'s tensors, and only after checking the
    whole structure, every kind of tensor and every shape, so a mismatch
    leaves it untouched.

    Raises:
        StructureMismatchError: the structures, the kinds of tensor or a pair
            of shapes differ.
        UnsupportedLeafError: ``type_check`` and an unsupported value.
    """
    fn = "copy_state_dict"
    if type_check:
        check_leaf_types(fn, state_dict)
    paths, src, dst, spec = pair_leaves(fn, state_dict, copy_state_dict)
    pairs: list[tuple[torch.Tensor, torch.Tensor]] = []
    bad = []
    for path, s, d in zip(paths, src, dst):
        s_local, d_local = local_tensors(s), local_tensors(d)
        if s_local is None and d_local is None:
            continue
        if (
            s_local is None
            or d_local is None
            or _describe(s, shapes=False) != _describe(d, shapes=False)
            or getattr(s, "shape", None) != getattr(d, "shape", None)
            or [t.shape for t in s_local] != [t.shape for t in d_local]
        ):
            bad.append(f"{codify(path)}: {_describe(s)} vs {_describe(d)}")
            continue
        pairs.extend(zip(d_local, s_local))
    if bad:
        raise StructureMismatchError(
            f"{fn}: {len(bad)} value(s) cannot be copied: {preview(bad, quote=False)}. "
            "Allocate the copy with create_cpu_state_dict(state_dict)."
        )
    for d_tensor, s_tensor in pairs:
        d_tensor.copy_(s_tensor, non_blocking=non_blocking)
    out = [d if local_tensors(s) is not None else s for s, d in zip(src, dst)]
    result: dict[str, Any] = tree_unflatten(spec, out)
    return result


def _describe(leaf: Any, *, shapes: bool = True) -> str:
    """``leaf`` in an error message: its kind of tensor (DTensor with its
    placements, ShardedTensor, tensor), shape and local shapes."""
    local = local_tensors(leaf)
    if local is None:
        return type(leaf).__name__
    if not isinstance(leaf, (sharded_tensor_type(), dtensor_type())):
        return f"tensor{tuple(leaf.shape)} {leaf.dtype}" if shapes else "tensor"
    kind = "DTensor" if isinstance(leaf, dtensor_type()) else "ShardedTensor"
    if kind == "DTensor":
        kind += f"[{', '.join(map(repr, leaf._spec.placements))}]"
    if not shapes:
        return kind
    return f"{kind}{tuple(leaf.shape)} {leaf.dtype} with local {[tuple(t.shape) for t in local]}"


def _dtensors(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """The DTensor values of a flat state dict, by key."""
    dtensor = sys.modules.get("torch.distributed.tensor")
    if dtensor is None:
        return {}
    cls = dtensor.DTensor
    return {key: value for key, value in state_dict.items() if isinstance(value, cls)}


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
            f"{preview(bad, quote=False)}. Nothing was written."
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
    buckets (see :meth:`~sdtree.transforms.broadcast.Announcement.deliver`):
    values land in the local shard of each DTensor (scattered, for FSDP2's
    layout: each rank receives only its rows, into its shard), keys of ``local_state_dict`` that rank 0 lacks are
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
    announced = announce(full_state_dict if dist.get_rank(pg) == 0 else {}, group=pg)
    # FSDP2's layout: each rank receives only its rows, straight into its local shard
    received = announced.deliver(
        place=None if as_arrived else place,
        into=(lambda path: templates.get(path[0]) if len(path) == 1 else None) if templates else None,
    )
    for key, value in received.items():
        if key not in local_state_dict:
            continue
        if cpu_offload and isinstance(value, torch.Tensor):
            value = value.cpu()
        local_state_dict[key] = value
    if strict:
        for key in [k for k in local_state_dict if k not in received]:
            del local_state_dict[key]


def deliver_into(
    announced: Announcement,
    *,
    into: Callable[[Path], Any],
    place: Optional[Callable[[Path, torch.Tensor], Any]] = None,
    shards: Optional[Callable[[Path], Any]] = None,
    bucket_bytes: int = DEFAULT_BUCKET_BYTES,
) -> Any:
    """:meth:`Announcement.deliver`, but received straight into tensors you
    hold: each tensor lands in the first of

    - ``into(path)`` (or ``shards(path)``, not written), a DTensor laid out
      as FSDP2 lays out, of the tensor's shape and dtype: scattered, each
      rank receiving only its rows, into the DTensor's local tensor (which
      is returned) when it has memory, else as a new DTensor of that layout;
    - ``into(path)``, a tensor of the same shape and dtype, contiguous, not
      in inference mode, on the process group's device, and not another
      view of the sent tensor's memory: written in place (a tensor that
      travels alone is received straight into it) and returned;
    - ``place(path, tensor)``: its result is kept, as soon as the tensor arrives;
    - the tensor itself, as :meth:`Announcement.deliver` gives it.

    So a load needs no memory beyond its buckets, and a sharded one
    receives O(its shards). An error while landing (in ``place``, or a
    copy) is raised after the last tensor has moved.

    Collective (outside a process group, rank 0's tensors go straight to
    ``into`` and ``place``): call on every rank, after ``announce``, with
    the same DTensor layouts on every rank. Writes into the tensors ``into`` gives.
    """
    return announced.deliver(bucket_bytes=bucket_bytes, place=place, shards=shards, into=into)
