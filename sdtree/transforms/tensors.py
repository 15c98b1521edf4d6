"""Tensor transforms: offload to CPU, move to a device, allocate CPU copies,
compare structures; and what kind of tensor a leaf is (DTensor,
ShardedTensor) and which local tensors hold its data.

Transforms here map every tensor leaf of a state dict (model or optimizer,
nested or flat) and keep everything else: containers are rebuilt, non-tensor
leaves and tensors that need no change are shared, inputs are never mutated.
When copies are needed, CPU memory comes as one allocation per dtype (a
pinned or shared allocation is costly per call), unless ``bulk=False``.
Copying into a preallocated state dict writes into it, so it is not here:
see :func:`sdtree.state_dict_utils.copy_state_dict`.
"""

from __future__ import annotations

import io
import math
import sys
from collections.abc import Sequence
from typing import Any, Optional, Union

import attrs
import torch

from sdtree._collectives import rank
from sdtree._tree import (
    codify,
    tree_flatten,
    tree_flatten_keyed,
    tree_flatten_with_path,
    tree_map,
    tree_unflatten,
)
from sdtree.errors import StructureMismatchError, UnsupportedLeafError, preview
from sdtree.transforms.compose import Transform

__all__ = [
    "offload_to_cpu",
    "path_differences",
    "to_device",
    "create_cpu_state_dict",
    "check_state_dict_similarity",
    "offload_state_dict_to_cpu",
    "allocate",
    "contiguous_strides",
    "dtensor_type",
    "is_dtensor",
    "sharded_tensor_type",
    "is_sharded_tensor",
    "local_tensors",
    "rewrap",
    "pair_leaves",
    "check_leaf_types",
]

_CPU = torch.device("cpu")


def _pinning_available() -> bool:
    return torch.cuda.is_available()


def _bulk_ok(tensor: torch.Tensor) -> bool:
    """A plain strided tensor (nn.Parameter included: it disables torch
    functions), not a subclass such as DTensor with behaviour of its own."""
    cls = type(tensor)
    return (
        (cls is torch.Tensor or cls.__torch_function__ is torch._C._disabled_torch_function_impl)
        and tensor.layout == torch.strided
        and not tensor.is_quantized
        and not tensor.is_meta
    )


def allocate(
    specs: list[tuple[torch.Size, torch.dtype]],
    *,
    device: Union[str, torch.device] = "cpu",
    pin_memory: bool = False,
    share_memory: bool = False,
    bulk: bool = True,
) -> list[torch.Tensor]:
    """Return new uninitialised tensors of the given ``(shape, dtype)``s on
    ``device``: views of one allocation per dtype when ``bulk``."""
    device = torch.device(device)
    if not bulk:
        return [_one(shape, dtype, device, pin_memory, share_memory) for shape, dtype in specs]
    out: list[Optional[torch.Tensor]] = [None] * len(specs)
    by_dtype: dict[torch.dtype, list[int]] = {}
    for i, (_, dtype) in enumerate(specs):
        by_dtype.setdefault(dtype, []).append(i)
    for dtype, indices in by_dtype.items():
        numels = [math.prod(specs[i][0]) for i in indices]
        buffer = _one((sum(numels),), dtype, device, pin_memory, share_memory)
        offset = 0
        for i, numel in zip(indices, numels):
            shape = specs[i][0]
            # as_strided: several times cheaper than split() + view() per tensor
            out[i] = buffer.as_strided(shape, contiguous_strides(shape), offset)
            offset += numel
    return out  # type: ignore[return-value]


def contiguous_strides(shape: Any) -> tuple[int, ...]:
    """The strides of a contiguous tensor of ``shape``, as torch computes them."""
    strides = []
    step = 1
    for size in reversed(shape):
        strides.append(step)
        step *= max(size, 1)
    return tuple(reversed(strides))


def _allocate_cpu(
    tensors: list[torch.Tensor], *, pin_memory: bool, share_memory: bool, bulk: bool
) -> list[torch.Tensor]:
    """Return new uninitialised CPU tensors with the shapes and dtypes of ``tensors``."""
    if not bulk or not all(_bulk_ok(t) for t in tensors):
        return [_one(t.shape, t.dtype, _CPU, pin_memory, share_memory) for t in tensors]
    return allocate([(t.shape, t.dtype) for t in tensors], pin_memory=pin_memory, share_memory=share_memory)


def _one(shape: Any, dtype: torch.dtype, device: torch.device, pin_memory: bool, share_memory: bool) -> torch.Tensor:
    tensor = torch.empty(shape, dtype=dtype, device=device, pin_memory=pin_memory and device.type == "cpu")
    if share_memory:
        tensor.share_memory_()  # type: ignore[no-untyped-call]  # our own fresh tensor
    return tensor


def _meta_error(fn: str, state_dict: Any) -> UnsupportedLeafError:
    paths, leaves, _ = tree_flatten_with_path(state_dict)
    metas = [codify(p) for p, leaf in zip(paths, leaves) if isinstance(leaf, torch.Tensor) and leaf.is_meta]
    return UnsupportedLeafError(
        f"{fn}: {len(metas)} meta tensor(s) hold no data to copy: {preview(metas, quote=False)}. "
        "Materialise the model first, or apply drop_meta_tensors() before."
    )


def sharded_tensor_type() -> Any:
    """The legacy ``ShardedTensor`` class once torch has loaded it, else ``()``
    (for ``isinstance``: nothing is one before its module is imported)."""
    sharded = sys.modules.get("torch.distributed._shard.sharded_tensor")
    return sharded.ShardedTensor if sharded is not None else ()


def is_sharded_tensor(value: Any) -> bool:
    """Whether ``value`` is a legacy ``ShardedTensor`` (FSDP1's sharded state dicts)."""
    return isinstance(value, sharded_tensor_type())


def dtensor_type() -> Any:
    """The ``DTensor`` class once torch has loaded it, else ``()`` (as
    :func:`sharded_tensor_type`)."""
    dtensor = sys.modules.get("torch.distributed.tensor")
    return dtensor.DTensor if dtensor is not None else ()


def is_dtensor(value: Any) -> bool:
    """Whether ``value`` is a ``DTensor``."""
    return isinstance(value, dtensor_type())


def _with_local_tensors(value: Any, tensors: list[torch.Tensor]) -> Any:
    """A new ShardedTensor with ``value``'s metadata and group over ``tensors``
    as its local shards (no collective)."""
    from torch.distributed._shard.sharded_tensor.api import ShardedTensor
    from torch.distributed._shard.sharded_tensor.shard import Shard

    shards = [Shard(t, s.metadata) for t, s in zip(tensors, value.local_shards())]
    return ShardedTensor._init_from_local_shards_and_global_metadata(
        shards, value.metadata(), process_group=value._process_group
    )


def _with_local_tensor(value: Any, local: torch.Tensor) -> Any:
    """A new DTensor with ``value``'s mesh, placements, shape and stride over
    ``local`` (no collective)."""
    return type(value)(local, value._spec, requires_grad=False)


def _sharded_tensor_to_cpu(value: Any, pin: bool, share: bool) -> Any:
    """A ShardedTensor whose local shards are on CPU: itself when they are
    already, else a new one over CPU copies (same metadata, same group)."""
    shards = value.local_shards()
    if all(s.tensor.is_cpu and (not pin or s.tensor.is_pinned()) and (not share or s.tensor.is_shared()) for s in shards):
        return value
    return _with_local_tensors(value, [_offload_one(s.tensor, pin, share) for s in shards])


def _offload_one(tensor: torch.Tensor, pin: bool, share: bool) -> torch.Tensor:
    moved = tensor.detach().to(_CPU, copy=True)
    if pin:
        moved = moved.pin_memory()
    if share:
        moved.share_memory_()  # type: ignore[no-untyped-call]  # our own fresh tensor
    return moved


@attrs.frozen(repr=False)
class _OffloadToCpu(Transform):
    _factory = "offload_to_cpu"
    pin_memory: bool = False
    share_memory: bool = False
    bulk: bool = True

    def __call__(self, state_dict: Any, /) -> Any:
        pin = self.pin_memory and _pinning_available()
        share = self.share_memory
        leaves, spec = tree_flatten(state_dict)
        sharded_cls = sharded_tensor_type()
        for i, leaf in enumerate(leaves):
            if isinstance(leaf, sharded_cls):
                leaves[i] = _sharded_tensor_to_cpu(leaf, pin, share)
        todo = [
            i
            for i, leaf in enumerate(leaves)
            if isinstance(leaf, torch.Tensor)
            and not isinstance(leaf, sharded_cls)
            and (
                not leaf.is_cpu
                or (pin and not leaf.is_pinned())
                or (share and not leaf.is_shared())  # type: ignore[no-untyped-call]
            )
        ]
        if not todo:
            return tree_unflatten(spec, leaves)
        sources = [leaves[i] for i in todo]
        if any(t.is_meta for t in sources):
            raise _meta_error("offload_to_cpu", state_dict)
        bulk_ok = [_bulk_ok(t) for t in sources]
        plain = [(t.shape, t.dtype) for t, ok in zip(sources, bulk_ok) if ok]
        buffers = iter(allocate(plain, pin_memory=pin, share_memory=share, bulk=self.bulk))
        non_blocking = pin
        for i, source, ok in zip(todo, sources, bulk_ok):
            if ok:
                leaves[i] = next(buffers).copy_(source.detach(), non_blocking=non_blocking)
            else:
                moved = source.to(_CPU)
                if pin and not moved.is_pinned():
                    moved = moved.pin_memory()
                if share and not moved.is_shared():
                    moved = moved.clone().share_memory_()
                leaves[i] = moved
        if non_blocking:
            torch.cuda.synchronize()
        return tree_unflatten(spec, leaves)


def offload_to_cpu(*, pin_memory: bool = False, share_memory: bool = False, bulk: bool = True) -> Transform:
    """Return a transform that moves every tensor to CPU memory.

    CPU tensors that already satisfy the request are shared, not copied.
    Copies are made into one allocation per dtype (``bulk=True``); the
    results are then views of that allocation, which ``torch.save`` stores
    once but safetensors rejects: pass ``bulk=False`` for separate tensors.
    ``pin_memory`` takes effect only where CUDA is available.

    >>> import torch
    >>> sd = {"w": torch.ones(2)}
    >>> offload_to_cpu()(sd)["w"] is sd["w"]
    True

    Raises (when applied):
        UnsupportedLeafError: a meta tensor (no data to copy).
    """
    return _OffloadToCpu(pin_memory=pin_memory, share_memory=share_memory, bulk=bulk)


@attrs.frozen(repr=False)
class _ToDevice(Transform):
    _factory = "to_device"
    device: torch.device = attrs.field(converter=torch.device)

    def __call__(self, state_dict: Any, /) -> Any:
        device = self.device
        if device.type == "cpu":
            return offload_to_cpu()(state_dict)
        return tree_map(
            lambda leaf: leaf.to(device) if isinstance(leaf, torch.Tensor) else leaf,
            state_dict,
        )

    def __repr__(self) -> str:
        return f"to_device({str(self.device)!r})"


def to_device(device: Union[str, torch.device]) -> Transform:
    """Return a transform that moves every tensor to ``device``.

    Tensors already there are shared, not copied.

    >>> import torch
    >>> to_device("cpu")({"w": torch.ones(1)})
    {'w': tensor([1.])}
    """
    return _ToDevice(device)


# -- the utilities with torch's signatures -------------------------------------

_SUPPORTED_LEAVES = (torch.Tensor, int, float, str, bytes, io.BytesIO, type(None))


def check_leaf_types(fn: str, state_dict: Any) -> None:
    """Raise when ``state_dict`` holds a leaf DCP cannot save (``fn`` names the caller)."""
    leaves, _ = tree_flatten(state_dict)
    if all(isinstance(leaf, _SUPPORTED_LEAVES) for leaf in leaves):
        return
    paths, leaves, _ = tree_flatten_with_path(state_dict)
    bad = [
        f"{codify(p)} ({type(leaf).__name__})"
        for p, leaf in zip(paths, leaves)
        if not isinstance(leaf, _SUPPORTED_LEAVES)
    ]
    raise UnsupportedLeafError(
        f"{fn}: {len(bad)} value(s) of unsupported type: {preview(bad, quote=False)}. Supported: "
        "tensors, int, float, str, bytes, io.BytesIO and None, in dicts, lists and "
        "tuples. Pass type_check=False to pass other values through."
    )


def offload_state_dict_to_cpu(
    state_dict: dict[str, Any],
    *,
    ranks_only: tuple[int, ...] = (),
    type_check: bool = True,
) -> dict[str, Any]:
    """Return ``state_dict`` with every tensor on CPU (torch's
    ``_offload_state_dict_to_cpu``).

    Args:
        state_dict: the state dict; it is not changed.
        ranks_only: when not empty, only these ranks of the default process
            group get the result; the others get ``{}`` (outside a process
            group, this process is rank 0).
        type_check: raise on values DCP cannot save.

    Raises:
        UnsupportedLeafError: ``type_check`` and an unsupported value.
    """
    if type_check:
        check_leaf_types("offload_state_dict_to_cpu", state_dict)
    if ranks_only and rank() not in ranks_only:
        return {}
    result: dict[str, Any] = offload_to_cpu(bulk=False)(state_dict)
    return result


def local_tensors(leaf: Any) -> Optional[list[torch.Tensor]]:
    """The tensors that hold ``leaf``'s data on this rank: a DTensor's local
    tensor, a ShardedTensor's local shards, a tensor itself; None for other leaves."""
    if isinstance(leaf, sharded_tensor_type()):
        return [s.tensor for s in leaf.local_shards()]
    if isinstance(leaf, dtensor_type()):
        return [leaf._local_tensor]
    if isinstance(leaf, torch.Tensor):
        return [leaf]
    return None


def rewrap(leaf: Any, tensors: list[torch.Tensor]) -> Any:
    """A new leaf like ``leaf`` (as :func:`local_tensors` takes it apart) over
    ``tensors``: a DTensor with the same spec, a ShardedTensor with the same
    metadata and group, or ``tensors[0]`` (no collective)."""
    if isinstance(leaf, sharded_tensor_type()):
        return _with_local_tensors(leaf, tensors)
    if isinstance(leaf, dtensor_type()):
        return _with_local_tensor(leaf, tensors[0])
    return tensors[0]


@torch.no_grad()
def create_cpu_state_dict(
    state_dict: dict[str, Any], pin_memory: bool = False, share_memory: bool = False
) -> dict[str, Any]:
    """Return a state dict of the same structure with new, uninitialised CPU
    tensors in place of every tensor (torch's ``_create_cpu_state_dict``).

    A DTensor becomes a DTensor on the same mesh, with the same placements,
    shape and stride, over a new CPU local tensor; a ShardedTensor becomes a
    ShardedTensor with the same metadata over new CPU local shards (no
    collective either way). 0-dim tensors become ``tensor(0)``; tensors
    without elements become zeros; 0-dim DTensors, ShardedTensors without
    local shards and other leaves are shared, as torch shares them. The new
    tensors come from one allocation per dtype, pinned (where CUDA is
    available) and/or in shared memory as asked. Pair it with
    :func:`sdtree.state_dict_utils.copy_state_dict` to fill the copy each step.
    """
    pin = pin_memory and _pinning_available()
    leaves, spec = tree_flatten(state_dict)
    parts: list[tuple[int, list[torch.Tensor]]] = []
    wrapped = (sharded_tensor_type(), dtensor_type())
    for i, leaf in enumerate(leaves):
        local = local_tensors(leaf)
        if local is None:
            continue
        if isinstance(leaf, wrapped) and (not local or leaf.dim() == 0):
            continue  # a 0-dim DTensor, a ShardedTensor without local shards: torch shares those
        parts.append((i, local))
    sources = [t for _, local in parts for t in local]
    allocated = iter(_allocate_cpu(sources, pin_memory=pin, share_memory=share_memory, bulk=True))
    for i, local in parts:
        new = [next(allocated) for _ in local]
        for source, tensor in zip(local, new):
            if source.dim() == 0 or source.numel() == 0:
                tensor.zero_()
        leaves[i] = rewrap(leaves[i], new)
    result: dict[str, Any] = tree_unflatten(spec, leaves)
    return result


def pair_leaves(fn: str, a: Any, b: Any) -> tuple[list[Any], list[Any], list[Any], Any]:
    """Flatten ``a`` and ``b``, pairing leaves by dict key (not order), or raise
    with the paths that differ."""
    paths, a_leaves, a_spec = tree_flatten_keyed(a)
    _, b_leaves, b_spec = tree_flatten_keyed(b)
    if a_spec != b_spec:
        raise StructureMismatchError(f"{fn}: {_structure_diff(a, b)}")
    return paths, a_leaves, b_leaves, a_spec


def _structure_diff(a: Any, b: Any) -> str:
    parts = path_differences(
        [codify(p) for p in tree_flatten_with_path(a)[0]],
        [codify(p) for p in tree_flatten_with_path(b)[0]],
        missing="missing from the second",
        extra="unexpected path(s) in the second",
    )
    return "the state dicts differ in structure; " + ("; ".join(parts) or "the containers differ in type (dict vs list vs tuple)") + "."


def path_differences(expected: Sequence[str], found: Sequence[str], *, missing: str, extra: str) -> list[str]:
    """What tells two lists of (codified) paths apart, for an error: ``"N
    path(s) <missing>: ..."`` for those only in ``expected``, ``"N <extra>:
    ..."`` for those only in ``found``; ``[]`` when they hold the same paths
    (then their containers differ)."""
    expected_set, found_set = set(expected), set(found)
    gone = [p for p in dict.fromkeys(expected) if p not in found_set]
    new = [p for p in dict.fromkeys(found) if p not in expected_set]
    parts = []
    if gone:
        parts.append(f"{len(gone)} path(s) {missing}: {preview(gone, quote=False)}")
    if new:
        parts.append(f"{len(new)} {extra}: {preview(new, quote=False)}")
    return parts


def check_state_dict_similarity(
    state_dict: dict[str, Any],
    compared_state_dict: dict[str, Any],
) -> bool:
    """Return whether two state dicts have the same structure, and the same
    shape and dtype at every tensor (torch's ``_check_state_dict_similarity``).

    Non-tensor leaves are not compared.
    """
    try:
        _, a, b, _ = pair_leaves("check_state_dict_similarity", state_dict, compared_state_dict)
    except StructureMismatchError:
        return False
    return all(
        not isinstance(x, torch.Tensor)
        or (isinstance(y, torch.Tensor) and x.dtype == y.dtype and x.shape == y.shape)
        for x, y in zip(a, b)
    )
