"""The rule classes behind the tensor transforms of :mod:`sdtree.transforms.tensor_ops`:
what each matches (patterns, or a predicate for ``cast``/``map_tensors``),
how its keys group, the op it applies, its target keys and its inverse.
Built by the factories there; see :mod:`sdtree.transforms.rules` for how a
rule applies to each form of state dict.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Callable, Optional, Union

import attrs
import torch

from sdtree.errors import NotInvertibleError
from sdtree.transforms.compose import Transform
from sdtree.transforms.ops import CastOp, CatOp, MapOp, ReshapeOp, RopeOp, Sizes, SplitOp, StackOp, TransposeOp, UnbindOp
from sdtree.transforms.patterns import KeyPattern, PatternSet, key_pattern
from sdtree.transforms.rules import Group, Grouping, Op, TensorRule

__all__ = [
    "PatternRule",
    "Fuse",
    "Split",
    "Stacking",
    "Stack",
    "Unstack",
    "Unary",
    "PermuteForRope",
    "UnpermuteForRope",
    "TransposeRule",
    "ReshapeRule",
    "CastRule",
    "MapTensors",
    "Where",
    "EXACT_WIDENINGS",
]

Where = Union[str, Callable[[str], bool], None]


def _patterns(fn: str, texts: Sequence[str]) -> tuple[KeyPattern, ...]:
    return tuple(key_pattern(t, fn=fn) for t in texts)


class PatternRule(TensorRule):
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

    def _single_targets(self, grouping: Grouping) -> Optional[list[str]]:
        if len(self._target_patterns()) != 1 or type(self)._targets is not PatternRule._targets or not grouping.gids:
            return None
        template = self._target_patterns()[0].template(grouping.names)
        return list(map(template.format, *zip(*grouping.gids))) if grouping.names else [template] * len(grouping.gids)


@attrs.frozen(repr=False)
class Fuse(PatternRule):
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
        return CatOp(self.dim, self.sizes)

    def inverse(self) -> Transform:
        if self.sizes is None:
            raise NotInvertibleError(
                f"{self!r}.inverse(): the sizes of the parts are unknown; give fuse(..., sizes=(...)) "
                "or sizes='equal' to make it invertible."
            )
        sizes = self.sizes if isinstance(self.sizes, tuple) else None  # None: equal parts
        return Split(self.target, self.sources, sizes, self.dim, self.strict, self.other_entries)


@attrs.frozen(repr=False)
class Split(PatternRule):
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
        return SplitOp(self.dim, self.sizes, len(self.targets))

    def inverse(self) -> Transform:
        return Fuse(self.targets, self.source, self.dim, self.sizes or "equal", self.strict, self.other_entries)

@attrs.frozen(repr=False)
class Stacking(PatternRule):
    """The fields of stack and unstack, mirror images of each other."""

    source: str
    target: str
    over: str = attrs.field(kw_only=True)
    dim: int = 0
    strict: bool = True
    other_entries: str = "error"

    def _parse(self) -> tuple[tuple[KeyPattern, ...], tuple[KeyPattern, ...]]:
        return (key_pattern(self.source, fn=self._factory),), (key_pattern(self.target, fn=self._factory),)

    def _mirror(self, cls: type[Stacking]) -> Transform:
        return cls(self.target, self.source, over=self.over, dim=self.dim, strict=self.strict, other_entries=self.other_entries)


@attrs.frozen(repr=False)
class Stack(Stacking):
    _factory = "stack"

    def _over(self) -> Optional[str]:
        return self.over

    def _op(self) -> Op:
        return StackOp(self.dim)

    def inverse(self) -> Transform:
        return self._mirror(Unstack)


@attrs.frozen(repr=False)
class Unstack(Stacking):
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
        return UnbindOp(self.dim)

    def inverse(self) -> Transform:
        return self._mirror(Stack)


class Unary(PatternRule):
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

    def _grouped(self, keys: Sequence[str]) -> Grouping:
        where = self._where()
        if isinstance(where, str):
            return super()._grouped(keys)
        chosen = [k for k in keys if where is None or where(k)]
        if not chosen and self.strict:
            raise self._fail(
                "selects no key" + (" (no floating-point tensor)" if where is None else f" (where={where!r})")
                + ". Pass strict=False to allow no match."
            )
        return Grouping(("key",), list(zip(chosen)), list(zip(chosen)), None)

    def _targets(self, group: Group, n_outputs: int) -> list[str]:
        return list(group.members)

    def _in_place(self) -> bool:
        return True

    def _fixed_outputs(self) -> Optional[int]:
        return 1


@attrs.frozen(repr=False)
class PermuteForRope(Unary):
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
        return RopeOp(self.n_heads, self.head_dim, self._to_half_split)

    def inverse(self) -> Transform:
        return UnpermuteForRope(self.pattern, n_heads=self.n_heads, head_dim=self.head_dim, strict=self.strict, other_entries=self.other_entries)


@attrs.frozen(repr=False)
class UnpermuteForRope(PermuteForRope):
    _factory = "unpermute_for_rope"
    _to_half_split = False

    def inverse(self) -> Transform:
        return PermuteForRope(self.pattern, n_heads=self.n_heads, head_dim=self.head_dim, strict=self.strict, other_entries=self.other_entries)


@attrs.frozen(repr=False)
class TransposeRule(Unary):
    _factory = "transpose"
    pattern: str
    dim0: int
    dim1: int
    strict: bool = True
    other_entries: str = "error"

    def _where(self) -> Where:
        return self.pattern

    def _op(self) -> Op:
        return TransposeOp(self.dim0, self.dim1)

    def inverse(self) -> Transform:
        return self


@attrs.frozen(repr=False)
class ReshapeRule(Unary):
    _factory = "reshape"
    pattern: str
    shape: tuple[int, ...]
    from_shape: Optional[tuple[int, ...]] = None
    strict: bool = True
    other_entries: str = "error"

    def _where(self) -> Where:
        return self.pattern

    def _op(self) -> Op:
        return ReshapeOp(self.shape, self.from_shape)

    def inverse(self) -> Transform:
        if self.from_shape is None or -1 in self.shape:
            raise NotInvertibleError(
                f"{self!r}.inverse(): the old shape is unknown; give reshape(..., from_shape=(...)) "
                "and a target shape without -1 to make it invertible."
            )
        return ReshapeRule(self.pattern, self.from_shape, self.shape, self.strict, self.other_entries)


# widenings that hold every value of the narrower dtype exactly
EXACT_WIDENINGS = {
    (torch.bfloat16, torch.float32),
    (torch.bfloat16, torch.float64),
    (torch.float16, torch.float32),
    (torch.float16, torch.float64),
    (torch.float32, torch.float64),
}


@attrs.frozen(repr=False)
class CastRule(Unary):
    _factory = "cast"
    _takes_pending = False  # it selects by dtype or type, read off real tensors
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
        return CastOp(self.dtype, self.from_dtype)

    def inverse(self) -> Transform:
        if self.from_dtype is None or (self.from_dtype, self.dtype) not in EXACT_WIDENINGS:
            raise NotInvertibleError(
                f"{self!r}.inverse(): a cast loses precision unless it widens exactly "
                "(bfloat16/float16 -> float32, float32 -> float64): give cast(..., from_dtype=...) "
                "for such a widening."
            )
        return CastRule(self.from_dtype, self.where, self.dtype, self.strict)


@attrs.frozen(repr=False)
class MapTensors(Unary):
    _factory = "map_tensors"
    _takes_pending = False  # it selects by dtype or type, read off real tensors
    fn: Callable[[torch.Tensor], torch.Tensor] = attrs.field(eq=False)
    where: Where = attrs.field(default=None, eq=False)
    inverse_fn: Optional[Callable[[torch.Tensor], torch.Tensor]] = attrs.field(default=None, eq=False, alias="inverse")
    strict: bool = True

    def _where(self) -> Where:
        return self.where

    def _accepts(self, value: Any) -> bool:
        return self.where is not None or isinstance(value, torch.Tensor)

    def _op(self) -> Op:
        return MapOp(self.fn)

    def inverse(self) -> Transform:
        if self.inverse_fn is None:
            raise NotInvertibleError(f"{self!r}.inverse(): give map_tensors(fn, inverse=...) to make it invertible.")
        return MapTensors(self.inverse_fn, self.where, self.fn, self.strict)

    def __repr__(self) -> str:
        args = [getattr(self.fn, "__name__", repr(self.fn))]
        if self.where is not None:
            args.append(f"where={self.where!r}")
        if self.inverse_fn is not None:
            args.append(f"inverse={getattr(self.inverse_fn, '__name__', repr(self.inverse_fn))}")
        return f"map_tensors({', '.join(args)})"


