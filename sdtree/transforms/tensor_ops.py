"""Tensor transforms: fuse / split, stack / unstack, rotary permutations,
transpose, reshape, cast and map_tensors.

Each names its keys with key patterns (``"layers.{i}.attn.q.weight"``; see
:mod:`sdtree.transforms.patterns`), applies to model state dicts, FQN-keyed
and flat optimizer state dicts and ``(model, optim)`` pairs alike (see
:mod:`sdtree.transforms.rules`: optimizer moments follow their parameter),
plans meta tensors without data, and has an exact ``inverse()`` where the
mapping has one. Outputs are new tensors that share no memory with a
part of an input (a split's chunks are copies); inputs are never mutated.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Callable, Optional, Union

import attrs
import torch

from sdtree.errors import InvalidRuleError, NotInvertibleError
from sdtree.transforms.compose import Transform
from sdtree.transforms.patterns import KeyPattern, PatternSet, is_pattern, key_pattern
from sdtree.transforms.rules import Group, Misfit, Op, Spec, TensorRule

__all__ = [
    "fuse",
    "split",
    "stack",
    "unstack",
    "permute_for_rope",
    "unpermute_for_rope",
    "transpose",
    "reshape",
    "cast",
    "map_tensors",
]

Where = Union[str, Callable[[str], bool], None]


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


# -- ops ----------------------------------------------------------------------


Sizes = Union[tuple[int, ...], str, None]  # the parts' sizes along dim, "equal", or unknown


@attrs.frozen
class _CatOp(Op):
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
class _SplitOp(Op):
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
class _StackOp(Op):
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
class _UnbindOp(Op):
    dim: int

    def plan(self, names: Sequence[str], specs: Sequence[Spec]) -> list[Spec]:
        shape, dtype = specs[0]
        d = _axis(self.dim, len(shape), names)
        return [(shape[:d] + shape[d + 1 :], dtype)] * shape[d]

    def compute(self, tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        return [_copy(t) for t in tensors[0].detach().unbind(self.dim)]


@attrs.frozen
class _RopeOp(Op):
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
class _TransposeOp(Op):
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
class _ReshapeOp(Op):
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
class _CastOp(Op):
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
class _MapOp(Op):
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


# -- rules --------------------------------------------------------------------


def _patterns(fn: str, texts: Sequence[str]) -> tuple[KeyPattern, ...]:
    return tuple(key_pattern(t, fn=fn) for t in texts)


def _check_same_placeholders(fn: str, sources: Sequence[KeyPattern], targets: Sequence[KeyPattern]) -> None:
    for target in targets:
        for source in sources:
            if source.placeholders != target.placeholders:
                raise InvalidRuleError(
                    f"{fn}: source {source.text!r} and target {target.text!r} must have the same placeholders; "
                    f"the source has {sorted(source.placeholders)}, the target {sorted(target.placeholders)}."
                )


def _sizes(fn: str, sizes: Union[Sequence[int], str, None], n: int) -> Sizes:
    if sizes is None or sizes == "equal":
        return sizes
    out = tuple(sizes)
    ints = tuple(s for s in out if isinstance(s, int) and not isinstance(s, bool) and s > 0)
    if len(out) != n or len(ints) != n:
        raise InvalidRuleError(f"{fn}: sizes must be {n} positive ints (one per part) or 'equal', got sizes={sizes!r}.")
    return ints


def _check_other_entries(fn: str, value: str) -> None:
    if value not in ("error", "drop"):
        raise InvalidRuleError(f"{fn}: other_entries must be 'error' or 'drop', got other_entries={value!r}.")


class _PatternRule(TensorRule):
    """A rule whose sources are given as pattern strings; parsed once."""

    def __attrs_post_init__(self) -> None:
        parsed = self._parse()
        object.__setattr__(self, "_parsed", parsed)
        object.__setattr__(self, "_set", PatternSet(parsed[0]))

    def _parse(self) -> tuple[tuple[KeyPattern, ...], tuple[KeyPattern, ...]]:
        raise NotImplementedError

    def _sources(self) -> tuple[KeyPattern, ...]:
        parsed: tuple[tuple[KeyPattern, ...], tuple[KeyPattern, ...]] = getattr(self, "_parsed")
        return parsed[0]

    def _target_patterns(self) -> tuple[KeyPattern, ...]:
        parsed: tuple[tuple[KeyPattern, ...], tuple[KeyPattern, ...]] = getattr(self, "_parsed")
        return parsed[1]

    def _pattern_set(self) -> PatternSet:
        found: PatternSet = getattr(self, "_set")
        return found

    def _group_names(self) -> tuple[str, ...]:
        return self._target_patterns()[0].names if self._over() is None else tuple(
            n for n in self._sources()[0].names if n != self._over()
        )

    def _targets(self, group: Group, n_outputs: int) -> list[str]:
        templates: Optional[tuple[str, ...]] = getattr(self, "_templates", None)
        if templates is None:  # once per rule: each target as a template of the group's values
            names = self._group_names()
            templates = tuple(t.template(names) for t in self._target_patterns())
            object.__setattr__(self, "_templates", templates)
        values = [v for _, v in group.binding]
        return [t.format(*values) for t in templates]

    def _fixed_outputs(self) -> Optional[int]:
        return len(self._target_patterns())


@attrs.frozen(repr=False)
class _Fuse(_PatternRule):
    _factory = "fuse"
    sources: tuple[str, ...]
    target: str
    dim: int = 0
    sizes: Sizes = None
    strict: bool = True
    other_entries: str = "error"

    def _parse(self) -> tuple[tuple[KeyPattern, ...], tuple[KeyPattern, ...]]:
        return _patterns("fuse", self.sources), (key_pattern(self.target, fn="fuse"),)

    def _op(self) -> Op:
        return _CatOp(self.dim, self.sizes)

    def inverse(self) -> Transform:
        if self.sizes is None:
            raise NotInvertibleError(
                f"{self!r}.inverse(): the sizes of the parts are unknown; give fuse(..., sizes=(...)) "
                "or sizes='equal' to make it invertible."
            )
        sizes = self.sizes if isinstance(self.sizes, tuple) else None  # None: equal parts
        return _Split(self.target, self.sources, sizes, self.dim, self.strict, self.other_entries)


@attrs.frozen(repr=False)
class _Split(_PatternRule):
    _factory = "split"
    source: str
    targets: tuple[str, ...]
    sizes: Optional[tuple[int, ...]] = None
    dim: int = 0
    strict: bool = True
    other_entries: str = "error"

    def _parse(self) -> tuple[tuple[KeyPattern, ...], tuple[KeyPattern, ...]]:
        return (key_pattern(self.source, fn="split"),), _patterns("split", self.targets)

    def _op(self) -> Op:
        return _SplitOp(self.dim, self.sizes, len(self.targets))

    def inverse(self) -> Transform:
        return _Fuse(self.targets, self.source, self.dim, self.sizes or "equal", self.strict, self.other_entries)

@attrs.frozen(repr=False)
class _Stacking(_PatternRule):
    """The fields of stack and unstack, mirror images of each other."""

    source: str
    target: str
    over: str = attrs.field(kw_only=True)
    dim: int = 0
    strict: bool = True
    other_entries: str = "error"

    def _parse(self) -> tuple[tuple[KeyPattern, ...], tuple[KeyPattern, ...]]:
        return (key_pattern(self.source, fn=self._factory),), (key_pattern(self.target, fn=self._factory),)

    def _mirror(self, cls: type[_Stacking]) -> Transform:
        return cls(self.target, self.source, over=self.over, dim=self.dim, strict=self.strict, other_entries=self.other_entries)


@attrs.frozen(repr=False)
class _Stack(_Stacking):
    _factory = "stack"

    def _over(self) -> Optional[str]:
        return self.over

    def _op(self) -> Op:
        return _StackOp(self.dim)

    def inverse(self) -> Transform:
        return self._mirror(_Unstack)


@attrs.frozen(repr=False)
class _Unstack(_Stacking):
    _factory = "unstack"

    def _group_names(self) -> tuple[str, ...]:
        return self._sources()[0].names

    def _targets(self, group: Group, n_outputs: int) -> list[str]:
        binding = dict(group.binding)
        target = self._target_patterns()[0]
        return [target.format({**binding, self.over: str(i)}) for i in range(n_outputs)]

    def _fixed_outputs(self) -> Optional[int]:
        return None  # as many as the stacked dimension holds

    def _op(self) -> Op:
        return _UnbindOp(self.dim)

    def inverse(self) -> Transform:
        return self._mirror(_Stack)


class _Unary(_PatternRule):
    """A rule on single keys: each key that ``pattern`` matches (or, for
    ``where=``, that the predicate selects) maps to itself."""

    def _where(self) -> Where:
        raise NotImplementedError

    def _parse(self) -> tuple[tuple[KeyPattern, ...], tuple[KeyPattern, ...]]:
        where = self._where()
        if isinstance(where, str):
            pattern = key_pattern(where, fn=self._factory)
            return (pattern,), (pattern,)
        return (), ()

    def _group_names(self) -> tuple[str, ...]:
        return self._sources()[0].names if self._sources() else ()

    def _groups(self, keys: Sequence[str]) -> list[Group]:
        where = self._where()
        if isinstance(where, str):
            return super()._groups(keys)
        chosen = [k for k in keys if where is None or where(k)]
        if not chosen and self.strict:
            raise self._fail(
                "selects no key" + (" (no floating-point tensor)" if where is None else f" (where={where!r})")
                + ". Pass strict=False to allow no match."
            )
        return [Group((("key", k),), (k,)) for k in chosen]

    def _targets(self, group: Group, n_outputs: int) -> list[str]:
        return list(group.members)

    def _fixed_outputs(self) -> Optional[int]:
        return 1


@attrs.frozen(repr=False)
class _PermuteForRope(_Unary):
    _factory = "permute_for_rope"
    pattern: str
    n_heads: int = attrs.field(kw_only=True)
    head_dim: Optional[int] = None
    strict: bool = True
    other_entries: str = "error"
    _to_half_split = True

    def _where(self) -> Where:
        return self.pattern

    def _op(self) -> Op:
        return _RopeOp(self.n_heads, self.head_dim, self._to_half_split)

    def inverse(self) -> Transform:
        return _UnpermuteForRope(self.pattern, n_heads=self.n_heads, head_dim=self.head_dim, strict=self.strict, other_entries=self.other_entries)


@attrs.frozen(repr=False)
class _UnpermuteForRope(_PermuteForRope):
    _factory = "unpermute_for_rope"
    _to_half_split = False

    def inverse(self) -> Transform:
        return _PermuteForRope(self.pattern, n_heads=self.n_heads, head_dim=self.head_dim, strict=self.strict, other_entries=self.other_entries)


@attrs.frozen(repr=False)
class _TransposeRule(_Unary):
    _factory = "transpose"
    pattern: str
    dim0: int
    dim1: int
    strict: bool = True
    other_entries: str = "error"

    def _where(self) -> Where:
        return self.pattern

    def _op(self) -> Op:
        return _TransposeOp(self.dim0, self.dim1)

    def inverse(self) -> Transform:
        return self


@attrs.frozen(repr=False)
class _ReshapeRule(_Unary):
    _factory = "reshape"
    pattern: str
    shape: tuple[int, ...]
    from_shape: Optional[tuple[int, ...]] = None
    strict: bool = True
    other_entries: str = "error"

    def _where(self) -> Where:
        return self.pattern

    def _op(self) -> Op:
        return _ReshapeOp(self.shape, self.from_shape)

    def inverse(self) -> Transform:
        if self.from_shape is None or -1 in self.shape:
            raise NotInvertibleError(
                f"{self!r}.inverse(): the old shape is unknown; give reshape(..., from_shape=(...)) "
                "and a target shape without -1 to make it invertible."
            )
        return _ReshapeRule(self.pattern, self.from_shape, self.shape, self.strict, self.other_entries)


# widenings that hold every value of the narrower dtype exactly
_EXACT = {
    (torch.bfloat16, torch.float32),
    (torch.bfloat16, torch.float64),
    (torch.float16, torch.float32),
    (torch.float16, torch.float64),
    (torch.float32, torch.float64),
}


@attrs.frozen(repr=False)
class _CastRule(_Unary):
    _factory = "cast"
    dtype: torch.dtype
    where: Where = attrs.field(default=None, eq=False)
    from_dtype: Optional[torch.dtype] = None
    strict: bool = True

    def _where(self) -> Where:
        return self.where

    def _accepts(self, value: Any) -> bool:
        if self.where is not None:
            return True
        return isinstance(value, torch.Tensor) and (value.dtype.is_floating_point or value.dtype.is_complex)

    def _op(self) -> Op:
        return _CastOp(self.dtype, self.from_dtype)

    def inverse(self) -> Transform:
        if self.from_dtype is None or (self.from_dtype, self.dtype) not in _EXACT:
            raise NotInvertibleError(
                f"{self!r}.inverse(): a cast loses precision unless it widens exactly "
                "(bfloat16/float16 -> float32, float32 -> float64): give cast(..., from_dtype=...) "
                "for such a widening."
            )
        return _CastRule(self.from_dtype, self.where, self.dtype, self.strict)


@attrs.frozen(repr=False)
class _MapTensors(_Unary):
    _factory = "map_tensors"
    fn: Callable[[torch.Tensor], torch.Tensor] = attrs.field(eq=False)
    where: Where = attrs.field(default=None, eq=False)
    inverse_fn: Optional[Callable[[torch.Tensor], torch.Tensor]] = attrs.field(default=None, eq=False, alias="inverse")
    strict: bool = True

    def _where(self) -> Where:
        return self.where

    def _accepts(self, value: Any) -> bool:
        return self.where is not None or isinstance(value, torch.Tensor)

    def _op(self) -> Op:
        return _MapOp(self.fn)

    def inverse(self) -> Transform:
        if self.inverse_fn is None:
            raise NotInvertibleError(f"{self!r}.inverse(): give map_tensors(fn, inverse=...) to make it invertible.")
        return _MapTensors(self.inverse_fn, self.where, self.fn, self.strict)

    def __repr__(self) -> str:
        args = [getattr(self.fn, "__name__", repr(self.fn))]
        if self.where is not None:
            args.append(f"where={self.where!r}")
        if self.inverse_fn is not None:
            args.append(f"inverse={getattr(self.inverse_fn, '__name__', repr(self.inverse_fn))}")
        return f"map_tensors({', '.join(args)})"


# -- factories ----------------------------------------------------------------


def _int(fn: str, name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{fn}: {name} must be an int, got {name}={value!r}.")
    return value


def _where_arg(fn: str, where: Where) -> Where:
    if where is None or callable(where):
        return where
    if isinstance(where, str):
        key_pattern(where, fn=fn)
        return where
    raise TypeError(f"{fn}: where must be a key pattern (str), a callable key -> bool, or None, got where={where!r}.")


def fuse(
    sources: Sequence[str],
    target: str,
    *,
    dim: int = 0,
    sizes: Union[Sequence[int], str, None] = None,
    strict: bool = True,
    other_entries: str = "error",
) -> Transform:
    """Return a transform that concatenates the tensors at ``sources`` along
    ``dim`` into ``target``, once per binding of the placeholders.

    >>> import torch
    >>> t = fuse(["l.{i}.q", "l.{i}.k"], "l.{i}.qk", sizes=(2, 1))
    >>> out = t({"l.0.q": torch.zeros(2), "l.0.k": torch.ones(1), "b": 1})
    >>> {k: v.tolist() if isinstance(v, torch.Tensor) else v for k, v in out.items()}
    {'l.0.qk': [0.0, 0.0, 1.0], 'b': 1}
    >>> t.inverse()
    split('l.{i}.qk', ('l.{i}.q', 'l.{i}.k'), sizes=(2, 1))

    The fused tensor takes the place of the first source (in the state dict,
    and in its optimizer's ``param_groups``). ``sizes`` (the parts' sizes
    along ``dim``, or ``"equal"``) is checked when given, and makes
    :meth:`inverse` exact.
    ``other_entries="drop"`` drops optimizer entries not shaped like their
    parameter instead of raising.

    Raises (when applied):
        PatternMatchError: no key matches (under ``strict``), or a group
            lacks a source.
        TensorMismatchError: the sources differ outside ``dim`` or in dtype,
            or disagree with ``sizes``; optimizer entries that differ.
    """
    fn = "fuse"
    if isinstance(sources, str) or len(sources) < 2:
        raise TypeError(f"fuse: sources must be a sequence of two or more patterns, got sources={sources!r}.")
    parsed = _patterns(fn, sources)
    _check_same_placeholders(fn, parsed, (key_pattern(target, fn=fn),))
    _check_other_entries(fn, other_entries)
    return _Fuse(tuple(sources), target, _int(fn, "dim", dim), _sizes(fn, sizes, len(parsed)), strict, other_entries)


def split(
    source: str,
    targets: Sequence[str],
    *,
    sizes: Union[Sequence[int], str, None] = None,
    dim: int = 0,
    strict: bool = True,
    other_entries: str = "error",
) -> Transform:
    """Return a transform that splits the tensor at ``source`` along ``dim``
    into ``targets``: parts of ``sizes``, or equal parts (``None`` or
    ``"equal"``); the inverse of :func:`fuse`. The parts are copies
    (contiguous, their own memory).

    >>> import torch
    >>> out = split("w13", ["w1", "w3"])({"w13": torch.arange(4.0)})
    >>> {k: v.tolist() for k, v in out.items()}
    {'w1': [0.0, 1.0], 'w3': [2.0, 3.0]}

    Raises (when applied):
        PatternMatchError: no key matches (under ``strict``).
        TensorMismatchError: the tensor does not split as asked.
    """
    fn = "split"
    if isinstance(targets, str) or len(targets) < 2:
        raise TypeError(f"split: targets must be a sequence of two or more patterns, got targets={targets!r}.")
    parsed = _patterns(fn, targets)
    _check_same_placeholders(fn, (key_pattern(source, fn=fn),), parsed)
    _check_other_entries(fn, other_entries)
    parts = _sizes(fn, sizes, len(parsed))
    return _Split(source, tuple(targets), parts if isinstance(parts, tuple) else None, _int(fn, "dim", dim), strict, other_entries)


def _check_over(fn: str, over: str, stacked: KeyPattern, single: KeyPattern) -> None:
    """``single`` (one key per index) has ``stacked``'s placeholders and ``over``."""
    if not isinstance(over, str) or over not in single.placeholders:
        raise InvalidRuleError(f"{fn}: over={over!r} must be a placeholder of {single.text!r}.")
    if single.placeholders != stacked.placeholders | {over}:
        raise InvalidRuleError(
            f"{fn}: {single.text!r} must have the placeholders of {stacked.text!r} and {{{over}}}, no others; "
            f"it has {sorted(single.placeholders)}, the stacked key {sorted(stacked.placeholders)}."
        )


def stack(source: str, target: str, *, over: str, dim: int = 0, strict: bool = True, other_entries: str = "error") -> Transform:
    """Return a transform that stacks the tensors at ``source`` along a new
    ``dim`` into ``target``, ordered by the integer value of the placeholder
    ``over`` (MoE experts: ``stack("l.{i}.experts.{e}.w1", "l.{i}.experts.w1", over="e")``).

    >>> import torch
    >>> out = stack("e.{n}.w", "w", over="n")({"e.1.w": torch.ones(2), "e.0.w": torch.zeros(2)})
    >>> out["w"].tolist()
    [[0.0, 0.0], [1.0, 1.0]]

    Raises (when applied):
        PatternMatchError: indices that are not integers, have a gap (they
            must be 0..n-1) or repeat.
        TensorMismatchError: the tensors differ in shape or dtype.
    """
    fn = "stack"
    _check_over(fn, over, key_pattern(target, fn=fn), key_pattern(source, fn=fn))
    _check_other_entries(fn, other_entries)
    return _Stack(source, target, over=over, dim=_int(fn, "dim", dim), strict=strict, other_entries=other_entries)


def unstack(source: str, target: str, *, over: str, dim: int = 0, strict: bool = True, other_entries: str = "error") -> Transform:
    """Return a transform that splits the tensor at ``source`` along ``dim``
    into one tensor per index, at ``target`` with ``over`` = 0, 1, ...
    (the inverse of :func:`stack`). The parts are copies.

    >>> import torch
    >>> sorted(unstack("w", "e.{n}.w", over="n")({"w": torch.zeros(3, 2)}))
    ['e.0.w', 'e.1.w', 'e.2.w']
    """
    fn = "unstack"
    _check_over(fn, over, key_pattern(source, fn=fn), key_pattern(target, fn=fn))
    _check_other_entries(fn, other_entries)
    return _Unstack(source, target, over=over, dim=_int(fn, "dim", dim), strict=strict, other_entries=other_entries)


def _rope_args(fn: str, n_heads: int, head_dim: Optional[int]) -> None:
    if _int(fn, "n_heads", n_heads) <= 0:
        raise InvalidRuleError(f"{fn}: n_heads must be positive, got n_heads={n_heads!r}.")
    if head_dim is not None and (_int(fn, "head_dim", head_dim) <= 0 or head_dim % 2):
        raise InvalidRuleError(f"{fn}: head_dim must be a positive even int, got head_dim={head_dim!r}.")


def permute_for_rope(pattern: str, *, n_heads: int, head_dim: Optional[int] = None, strict: bool = True, other_entries: str = "error") -> Transform:
    """Return a transform that permutes the rows of each head of the q or k
    projections at ``pattern`` from the interleaved rotary layout (Meta's,
    torchtitan's) to the half-split one (Hugging Face's): the permutation
    Hugging Face's Llama conversion script applies,
    ``w.view(n_heads, head_dim // 2, 2, ...).transpose(1, 2).reshape(w.shape)``.

    ``head_dim`` defaults to dim 0 / ``n_heads``; pass ``n_kv_heads`` as
    ``n_heads`` for k under grouped-query attention.

    >>> import torch
    >>> permute_for_rope("q", n_heads=1)({"q": torch.arange(4.0)})["q"].tolist()
    [0.0, 2.0, 1.0, 3.0]

    See also: :func:`unpermute_for_rope`, its inverse.

    Raises (when applied):
        TensorMismatchError: dim 0 is not ``n_heads * head_dim``, or ``head_dim`` is odd.
    """
    fn = "permute_for_rope"
    key_pattern(pattern, fn=fn)
    _rope_args(fn, n_heads, head_dim)
    _check_other_entries(fn, other_entries)
    return _PermuteForRope(pattern, n_heads=n_heads, head_dim=head_dim, strict=strict, other_entries=other_entries)


def unpermute_for_rope(pattern: str, *, n_heads: int, head_dim: Optional[int] = None, strict: bool = True, other_entries: str = "error") -> Transform:
    """Return a transform that permutes q or k rows from the half-split
    rotary layout (Hugging Face's) back to the interleaved one (what
    torchtitan's Llama adapter does): the inverse of :func:`permute_for_rope`.

    >>> import torch
    >>> unpermute_for_rope("q", n_heads=1)({"q": torch.tensor([0.0, 2.0, 1.0, 3.0])})["q"].tolist()
    [0.0, 1.0, 2.0, 3.0]
    """
    fn = "unpermute_for_rope"
    key_pattern(pattern, fn=fn)
    _rope_args(fn, n_heads, head_dim)
    _check_other_entries(fn, other_entries)
    return _UnpermuteForRope(pattern, n_heads=n_heads, head_dim=head_dim, strict=strict, other_entries=other_entries)


def transpose(pattern: str, dim0: int, dim1: int, *, strict: bool = True, other_entries: str = "error") -> Transform:
    """Return a transform that swaps ``dim0`` and ``dim1`` of the tensors at
    ``pattern`` (contiguous copies); it is its own inverse.

    >>> import torch
    >>> transpose("w", 0, 1)({"w": torch.zeros(2, 3)})["w"].shape
    torch.Size([3, 2])
    """
    fn = "transpose"
    key_pattern(pattern, fn=fn)
    if _int(fn, "dim0", dim0) == _int(fn, "dim1", dim1):
        raise InvalidRuleError(f"transpose: dim0 and dim1 are both {dim0}: the transform would change nothing.")
    _check_other_entries(fn, other_entries)
    return _TransposeRule(pattern, dim0, dim1, strict, other_entries)


def _shape_arg(fn: str, name: str, shape: Sequence[int]) -> tuple[int, ...]:
    out = tuple(shape)
    if not all(isinstance(s, int) and (s >= 0 or s == -1) for s in out) or out.count(-1) > 1:
        raise InvalidRuleError(f"{fn}: {name} must be ints >= 0 with at most one -1, got {name}={shape!r}.")
    return out


def reshape(pattern: str, shape: Sequence[int], *, from_shape: Optional[Sequence[int]] = None, strict: bool = True, other_entries: str = "error") -> Transform:
    """Return a transform that reshapes the tensors at ``pattern`` to ``shape``
    (one ``-1`` allowed). With ``from_shape`` (checked on every tensor),
    :meth:`inverse` reshapes back.

    >>> import torch
    >>> reshape("w", (2, -1))({"w": torch.zeros(6)})["w"].shape
    torch.Size([2, 3])
    """
    fn = "reshape"
    key_pattern(pattern, fn=fn)
    old = _shape_arg(fn, "from_shape", from_shape) if from_shape is not None else None
    if old is not None and -1 in old:
        raise InvalidRuleError(f"reshape: from_shape must be a full shape, without -1, got from_shape={from_shape!r}.")
    _check_other_entries(fn, other_entries)
    return _ReshapeRule(pattern, _shape_arg(fn, "shape", shape), old, strict, other_entries)


def cast(dtype: torch.dtype, *, where: Where = None, from_dtype: Optional[torch.dtype] = None, strict: bool = True) -> Transform:
    """Return a transform that casts tensors to ``dtype``: every floating-point
    tensor (``where=None``), or those whose keys ``where`` selects (a key
    pattern, or a callable key -> bool; integer tensors selected are an
    error). In optimizer state dicts, the entries shaped like their
    parameter are cast; ``step`` and other scalars are kept.

    A cast loses precision, so it has no inverse, unless it is declared a
    widening that holds every value exactly: ``cast(torch.float32,
    from_dtype=torch.bfloat16).inverse()`` is ``cast(torch.bfloat16,
    from_dtype=torch.float32)`` (``from_dtype`` is checked on every tensor).

    >>> import torch
    >>> out = cast(torch.bfloat16)({"w": torch.zeros(2), "n": torch.tensor([3])})
    >>> out["w"].dtype, out["n"].dtype
    (torch.bfloat16, torch.int64)
    """
    fn = "cast"
    for name, value in (("dtype", dtype), ("from_dtype", from_dtype)):
        if value is not None and not isinstance(value, torch.dtype):
            raise TypeError(f"cast: {name} must be a torch.dtype, got {name}={value!r}.")
    if not (dtype.is_floating_point or dtype.is_complex):
        raise InvalidRuleError(f"cast: dtype={dtype} is not a floating-point dtype; casting to integers is refused.")
    return _CastRule(dtype, _where_arg(fn, where), from_dtype, strict)


def map_tensors(
    fn: Callable[[torch.Tensor], torch.Tensor],
    *,
    where: Where = None,
    inverse: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
    strict: bool = True,
) -> Transform:
    """Return a transform that replaces each tensor (``where=None``), or each
    tensor whose key ``where`` selects, by ``fn(tensor)``: the escape hatch.
    ``fn`` must not mutate its argument. With ``inverse``, :meth:`inverse`
    maps back; meta tensors are planned by running ``fn`` on them.

    >>> import torch
    >>> map_tensors(torch.neg, where="w")({"w": torch.ones(1), "b": torch.ones(1)})
    {'w': tensor([-1.]), 'b': tensor([1.])}
    """
    if not callable(fn) or (inverse is not None and not callable(inverse)):
        raise TypeError(f"map_tensors: fn and inverse must be callables tensor -> tensor, got fn={fn!r}, inverse={inverse!r}.")
    return _MapTensors(fn, _where_arg("map_tensors", where), inverse, strict)
