"""The operations the tensor rules apply to one group's tensors: concatenate,
split, stack, unbind, the rotary permutation, transpose, reshape, cast, and
a user's function.

Each :class:`~sdtree.transforms.rules.Op` plans shapes and dtypes without data
(``plan``, raising :class:`~sdtree.transforms.rules.Misfit` with what was
expected and found) and computes (``compute``). Outputs are new tensors that
share no memory with a part of an input (a split's chunks are copies).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Callable, Optional, Union

import attrs
import torch

from sdtree.transforms.rules import Misfit, Op, Spec

__all__ = [
    "CatOp",
    "SplitOp",
    "StackOp",
    "UnbindOp",
    "RopeOp",
    "TransposeOp",
    "ReshapeOp",
    "CastOp",
    "MapOp",
    "Sizes",
]


def _axis(dim: int, ndim: int, names: Sequence[str]) -> int:
    if not -ndim <= dim < ndim:
        raise Misfit(f"dim={dim} is out of range for {_preview_names(names)} of {ndim} dimension(s)")
    return dim % ndim


def _preview_names(names: Sequence[str]) -> str:
    shown = ", ".join(repr(n) for n in names[:4])
    return shown + (f", ... ({len(names) - 4} more)" if len(names) > 4 else "")


def _shapes(names: Sequence[str], specs: Sequence[Spec]) -> str:
    return ", ".join(f"{n!r} {tuple(s)}" for n, (s, _) in zip(names, specs))


def _one_dtype(names: Sequence[str], specs: Sequence[Spec]) -> torch.dtype:
    dtypes = {d for _, d in specs}
    if len(dtypes) > 1:
        shown = ", ".join(f"{n!r} {d}" for n, (_, d) in zip(names, specs))
        raise Misfit(f"the sources differ in dtype ({shown}); cast them to one dtype first")
    return specs[0][1]


def _copy(tensor: torch.Tensor) -> torch.Tensor:
    """A contiguous tensor with its own memory."""
    return tensor.clone(memory_format=torch.contiguous_format)


Sizes = Union[tuple[int, ...], str, None]  # the parts' sizes along dim, "equal", or unknown


@attrs.frozen
class CatOp(Op):
    dim: int
    sizes: Sizes

    def plan(self, names: Sequence[str], specs: Sequence[Spec]) -> list[Spec]:
        dtype = _one_dtype(names, specs)
        shapes = [s for s, _ in specs]
        if len({len(s) for s in shapes}) > 1:
            raise Misfit(f"the sources differ in number of dimensions ({_shapes(names, specs)})")
        d = _axis(self.dim, len(shapes[0]), names)
        rest = {s[:d] + s[d + 1 :] for s in shapes}
        if len(rest) > 1:
            raise Misfit(f"the sources differ outside dim {d} ({_shapes(names, specs)}); only dim {d} may differ")
        found = tuple(s[d] for s in shapes)
        if self.sizes == "equal" and len(set(found)) > 1:
            raise Misfit(f"sizes='equal' but the sources have {found} along dim {d} ({_shapes(names, specs)})")
        if isinstance(self.sizes, tuple) and found != self.sizes:
            raise Misfit(f"sizes={self.sizes} but the sources have {found} along dim {d} ({_shapes(names, specs)})")
        shape = list(shapes[0])
        shape[d] = sum(s[d] for s in shapes)
        return [(tuple(shape), dtype)]

    def compute(self, tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        return [torch.cat([t.detach() for t in tensors], self.dim)]


@attrs.frozen
class SplitOp(Op):
    dim: int
    sizes: Optional[tuple[int, ...]]
    n: int

    def _sizes(self, names: Sequence[str], shape: tuple[int, ...]) -> tuple[int, tuple[int, ...]]:
        d = _axis(self.dim, len(shape), names)
        if self.sizes is not None:
            if sum(self.sizes) != shape[d]:
                raise Misfit(f"sizes={self.sizes} add up to {sum(self.sizes)}, but {names[0]!r} {tuple(shape)} has {shape[d]} along dim {d}")
            return d, self.sizes
        if shape[d] % self.n:
            raise Misfit(
                f"{names[0]!r} {tuple(shape)} has {shape[d]} along dim {d}, which does not split into {self.n} equal parts; "
                "pass sizes=(...) for unequal parts"
            )
        return d, (shape[d] // self.n,) * self.n

    def plan(self, names: Sequence[str], specs: Sequence[Spec]) -> list[Spec]:
        shape, dtype = specs[0]
        d, sizes = self._sizes(names, shape)
        return [(shape[:d] + (size,) + shape[d + 1 :], dtype) for size in sizes]

    def compute(self, tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        source = tensors[0].detach()
        d, sizes = self._sizes(["source"], tuple(source.shape))
        return [_copy(chunk) for chunk in torch.split(source, list(sizes), d)]


@attrs.frozen
class StackOp(Op):
    dim: int

    def plan(self, names: Sequence[str], specs: Sequence[Spec]) -> list[Spec]:
        dtype = _one_dtype(names, specs)
        shapes = {s for s, _ in specs}
        if len(shapes) > 1:
            raise Misfit(f"stacked tensors must have one shape ({_shapes(names, specs)})")
        shape = specs[0][0]
        d = _axis(self.dim, len(shape) + 1, names)
        return [(shape[:d] + (len(specs),) + shape[d:], dtype)]

    def compute(self, tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        return [torch.stack([t.detach() for t in tensors], self.dim)]


@attrs.frozen
class UnbindOp(Op):
    dim: int

    def plan(self, names: Sequence[str], specs: Sequence[Spec]) -> list[Spec]:
        shape, dtype = specs[0]
        d = _axis(self.dim, len(shape), names)
        return [(shape[:d] + shape[d + 1 :], dtype)] * shape[d]

    def compute(self, tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        return [_copy(t) for t in tensors[0].detach().unbind(self.dim)]


@attrs.frozen
class RopeOp(Op):
    n_heads: int
    head_dim: Optional[int]
    to_half_split: bool

    def _head_dim(self, names: Sequence[str], shape: tuple[int, ...]) -> int:
        if not shape:
            raise Misfit(f"{names[0]!r} is 0-dim; the rotary permutation acts on dim 0 (heads x head_dim)")
        rows = shape[0]
        if self.head_dim is None and rows % self.n_heads:
            raise Misfit(
                f"{names[0]!r} {tuple(shape)}: dim 0 is {rows}, which does not divide by n_heads={self.n_heads}; "
                "check n_heads (n_kv_heads for k)"
            )
        head_dim = self.head_dim if self.head_dim is not None else rows // self.n_heads
        if rows != self.n_heads * head_dim:
            raise Misfit(
                f"{names[0]!r} {tuple(shape)}: dim 0 is {rows}, not n_heads={self.n_heads} x head_dim={head_dim}; "
                "check n_heads (n_kv_heads for k) and head_dim"
            )
        if head_dim % 2:
            raise Misfit(f"{names[0]!r} {tuple(shape)}: head_dim={head_dim} is odd; rotary embeddings pair dimensions")
        return head_dim

    def plan(self, names: Sequence[str], specs: Sequence[Spec]) -> list[Spec]:
        self._head_dim(names, specs[0][0])
        return [specs[0]]

    def compute(self, tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        w = tensors[0].detach()
        shape = tuple(w.shape)
        half = self._head_dim(["tensor"], shape) // 2
        inner = (half, 2) if self.to_half_split else (2, half)
        return [w.reshape(self.n_heads, *inner, *shape[1:]).transpose(1, 2).reshape(shape).contiguous()]


@attrs.frozen
class TransposeOp(Op):
    dim0: int
    dim1: int

    def plan(self, names: Sequence[str], specs: Sequence[Spec]) -> list[Spec]:
        shape, dtype = specs[0]
        a, b = _axis(self.dim0, len(shape), names), _axis(self.dim1, len(shape), names)
        out = list(shape)
        out[a], out[b] = shape[b], shape[a]
        return [(tuple(out), dtype)]

    def compute(self, tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        return [tensors[0].detach().transpose(self.dim0, self.dim1).contiguous()]


@attrs.frozen
class ReshapeOp(Op):
    shape: tuple[int, ...]
    from_shape: Optional[tuple[int, ...]]

    def plan(self, names: Sequence[str], specs: Sequence[Spec]) -> list[Spec]:
        shape, dtype = specs[0]
        if self.from_shape is not None and shape != self.from_shape:
            raise Misfit(f"{names[0]!r} has shape {tuple(shape)}, not from_shape={self.from_shape}")
        numel = math.prod(shape)
        known = math.prod(s for s in self.shape if s != -1)
        out = self.shape
        if -1 in out:
            if known == 0 or numel % known:
                raise Misfit(f"{names[0]!r} {tuple(shape)} ({numel} elements) cannot be reshaped to {self.shape}")
            out = tuple(numel // known if s == -1 else s for s in out)
        if math.prod(out) != numel:
            raise Misfit(f"{names[0]!r} {tuple(shape)} ({numel} elements) cannot be reshaped to {self.shape} ({math.prod(out)} elements)")
        return [(out, dtype)]

    def compute(self, tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        return [tensors[0].detach().reshape(self.shape)]


@attrs.frozen
class CastOp(Op):
    dtype: torch.dtype
    from_dtype: Optional[torch.dtype]

    def plan(self, names: Sequence[str], specs: Sequence[Spec]) -> list[Spec]:
        shape, dtype = specs[0]
        if not (dtype.is_floating_point or dtype.is_complex):
            raise Misfit(
                f"{names[0]!r} is {dtype}: integer and bool tensors are not cast (their values would change "
                "meaning); narrow where= to floating-point tensors"
            )
        if self.from_dtype is not None and dtype != self.from_dtype:
            raise Misfit(f"{names[0]!r} is {dtype}, not from_dtype={self.from_dtype}")
        return [(shape, self.dtype)]

    def compute(self, tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        return [tensors[0].detach().to(self.dtype)]


@attrs.frozen
class MapOp(Op):
    fn: Callable[[torch.Tensor], torch.Tensor]

    def plan(self, names: Sequence[str], specs: Sequence[Spec]) -> Optional[list[Spec]]:
        shape, dtype = specs[0]
        try:
            out = self.fn(torch.empty(shape, dtype=dtype, device="meta"))
        except Exception:  # noqa: BLE001  # fn need not support meta tensors: then only data can tell
            return None
        if not isinstance(out, torch.Tensor):
            raise Misfit(f"fn returned {type(out).__name__} for {names[0]!r}, not a tensor")
        return [(tuple(out.shape), out.dtype)]

    def compute(self, tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        out = self.fn(tensors[0])
        if not isinstance(out, torch.Tensor):
            raise TypeError(f"map_tensors: fn returned {type(out).__name__}, not a tensor.")
        return [out]


