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

from collections.abc import Sequence
from typing import Any, Callable, Optional, Union

import torch

from sdtree.errors import InvalidRuleError
from sdtree.transforms.compose import Transform
from sdtree.transforms.ops import Sizes
from sdtree.transforms.patterns import KeyPattern, key_pattern
from sdtree.transforms.tensor_rules import (
    CastRule,
    Fuse,
    MapTensors,
    PermuteForRope,
    ReshapeRule,
    Split,
    Stack,
    TransposeRule,
    UnpermuteForRope,
    Unstack,
    Where,
)

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
    parsed = tuple(key_pattern(t, fn=fn) for t in sources)
    _check_same_placeholders(fn, parsed, (key_pattern(target, fn=fn),))
    _check_other_entries(fn, other_entries)
    return Fuse(tuple(sources), target, _int(fn, "dim", dim), _sizes(fn, sizes, len(parsed)), strict, other_entries)


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
    parsed = tuple(key_pattern(t, fn=fn) for t in targets)
    _check_same_placeholders(fn, (key_pattern(source, fn=fn),), parsed)
    _check_other_entries(fn, other_entries)
    parts = _sizes(fn, sizes, len(parsed))
    return Split(source, tuple(targets), parts if isinstance(parts, tuple) else None, _int(fn, "dim", dim), strict, other_entries)


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
    return Stack(source, target, over=over, dim=_int(fn, "dim", dim), strict=strict, other_entries=other_entries)


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
    return Unstack(source, target, over=over, dim=_int(fn, "dim", dim), strict=strict, other_entries=other_entries)


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
    return PermuteForRope(pattern, n_heads=n_heads, head_dim=head_dim, strict=strict, other_entries=other_entries)


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
    return UnpermuteForRope(pattern, n_heads=n_heads, head_dim=head_dim, strict=strict, other_entries=other_entries)


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
    return TransposeRule(pattern, dim0, dim1, strict, other_entries)


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
    return ReshapeRule(pattern, _shape_arg(fn, "shape", shape), old, strict, other_entries)


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
    return CastRule(dtype, _where_arg(fn, where), from_dtype, strict)


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
    return MapTensors(fn, _where_arg("map_tensors", where), inverse, strict)

