"""Plans: what the tensor rules make of meta tensors, and how to compute it later.

An :class:`Op` plans one group's outputs (shapes and dtypes) and computes
them. On meta inputs a rule computes nothing: each output is a meta tensor
that remembers its :class:`Derivation` (:func:`derivation_of`), so a
checkpoint reader computes it later from the tensors it stands for
(:func:`materialize`, :class:`Materializer`).

Inside a pipeline, a rule whose next step never reads values (another tensor
rule, a key transform) emits :class:`Pending` outputs instead: a shape, a
dtype and a derivation, several times cheaper to make than a meta tensor.
The pipeline turns the pending outputs left into meta tensors
(:func:`settle`) before a step that reads values and at its end, so no user
ever sees one; a derivation's sources may be pending outputs (a chain).
Between such steps a model state dict travels as :class:`Columns` (its keys
and values as two lists), so that no step builds a dict only for the next
to take apart; :func:`settle` builds the one dict the user gets.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from itertools import chain, compress, cycle, repeat
from operator import add, attrgetter, is_, itemgetter
from typing import Any, Callable, NamedTuple, Optional, Union

import torch

from sdtree._tree import tree_flatten

__all__ = [
    "Op",
    "Misfit",
    "Spec",
    "Derivation",
    "Pending",
    "Planned",
    "derivation_of",
    "materialize",
    "Materializer",
    "meta_outputs",
    "single_outputs",
    "Columns",
    "as_dict",
    "plan_in_place",
    "plan_fused",
    "settle",
]

Spec = tuple[tuple[int, ...], torch.dtype]  # an output's shape and dtype
_DERIVED = "_sdtree_derivation"  # the attribute of a planned output holding (derivation, index)


class Misfit(ValueError):
    """Raised by :meth:`Op.plan`: the inputs do not fit (the message says what
    was expected and found); the rule reports it as a TensorMismatchError."""


class Op:
    """What a rule does to one group's tensors.

    ``plan`` checks the inputs' shapes and dtypes and returns the outputs'
    (raising :class:`Misfit`, in terms of ``names``; ``None`` when only the
    data can tell); ``compute`` does it.
    """

    def plan(self, names: Sequence[str], specs: Sequence[Spec]) -> Optional[list[Spec]]:
        raise NotImplementedError

    def compute(self, tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        raise NotImplementedError


class Pending(tuple):  # type: ignore[type-arg]  # (shape, dtype, (derivation, index))
    """A planned output inside a pipeline, not yet a meta tensor: its shape,
    dtype and ``(derivation, index)``. Tensor rules and key transforms take
    it as they take a meta tensor; :func:`settle` makes it one. A tuple, so
    that many are made in C (``tuple.__new__(Pending, (shape, dtype, derived))``)."""

    __slots__ = ()
    is_meta = True  # what _run asks of every input
    shape = property(itemgetter(0))
    dtype = property(itemgetter(1))
    _sdtree_derivation = property(itemgetter(2))  # as _DERIVED on a planned meta tensor

    def __new__(cls, shape: tuple[int, ...], dtype: torch.dtype, derived: tuple[Derivation, int]) -> Pending:
        return tuple.__new__(cls, (shape, dtype, derived))

    def __repr__(self) -> str:
        return f"Pending({tuple(self.shape)}, {self.dtype})"


Planned = Union[torch.Tensor, Pending]  # a derivation's source
_SPEC, _DERIVATION = itemgetter(0, 1), itemgetter(2)  # of a Pending: (shape, dtype), (derivation, index)
_NEW, _DETACH = tuple.__new__, torch.Tensor.detach
_FIRST = itemgetter(0)


class Columns:
    """A model state dict between two steps of a pipeline that take pending
    outputs: its keys (unique strings) and its values, as two lists. Steps
    take it apart and make the next one by list operations in C, where a
    dict would be built at every step only for the next to take it apart
    again (a dict of 100,000 keys costs about 10 ms to build). Only tensor
    rules and key transforms make one, when a pipeline asks for pending
    outputs; :func:`settle` makes it a dict, so no user ever sees one."""

    __slots__ = ("keys", "values")

    def __init__(self, keys: list[str], values: list[Any]) -> None:
        self.keys, self.values = keys, values

    def items(self) -> Iterable[tuple[str, Any]]:
        return zip(self.keys, self.values)


def as_dict(tree: Any) -> Any:
    """``tree`` with a :class:`Columns` (alone or first of a pair) made a dict,
    its values as they are (pending ones stay pending)."""
    if type(tree) is Columns:
        return dict(zip(tree.keys, tree.values))
    if isinstance(tree, tuple) and len(tree) == 2 and type(tree[0]) is Columns:
        return as_dict(tree[0]), tree[1]
    return tree


class Derivation(NamedTuple):
    """How meta outputs are computed from the tensors they were planned from
    (``rule``: the factory name of the rule that planned them, for plans;
    ``outputs``: the planned shapes and dtypes). A tuple: one is made per
    planned group, so it is kept cheap."""

    op: Op
    sources: tuple[Planned, ...]
    rule: str
    outputs: Sequence[Spec]

    def compute(self, fetch: Callable[[torch.Tensor], torch.Tensor]) -> list[torch.Tensor]:
        return self.op.compute([materialize(s, fetch) for s in self.sources])


def derivation_of(tensor: Any) -> Optional[tuple[Derivation, int]]:
    """``(derivation, output index)`` of a meta tensor a rule planned, else None."""
    found: Optional[tuple[Derivation, int]] = getattr(tensor, _DERIVED, None)
    return found


def materialize(tensor: Planned, fetch: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """The data of ``tensor``: computed from its sources if a rule planned it
    (each source read with ``fetch``), else ``fetch(tensor)``."""
    derived = derivation_of(tensor)
    if derived is None:
        assert isinstance(tensor, torch.Tensor)  # a pending output always has a derivation
        return fetch(tensor)
    derivation, index = derived
    return derivation.compute(fetch)[index]


class Materializer:
    """Fetch the tensors of a planned tree one at a time, each group once.

    ``Materializer(tree, fetch)(leaf)`` is ``materialize(leaf, fetch)``, except
    that a group with several outputs (a split, an unstack) is computed once:
    its outputs wait until the last of those in ``tree`` is asked for, then
    are let go. So reading a tree output by output holds at most one group's
    sources and outputs at a time.
    """

    def __init__(self, tree: Any, fetch: Callable[[torch.Tensor], torch.Tensor]) -> None:
        self._fetch = fetch
        wanted: dict[int, int] = {}
        leaves = {id(leaf): leaf for leaf in tree_flatten(tree)[0] if isinstance(leaf, torch.Tensor)}
        for leaf in leaves.values():  # a leaf held under two keys (tied) is fetched once
            derived = derivation_of(leaf)
            if derived is not None:
                wanted[id(derived[0])] = wanted.get(id(derived[0]), 0) + 1
        self._wanted = wanted
        self._held: dict[int, list[torch.Tensor]] = {}

    def __call__(self, tensor: Planned) -> torch.Tensor:
        derived = derivation_of(tensor)
        if derived is None:
            assert isinstance(tensor, torch.Tensor)
            return self._fetch(tensor)
        derivation, index = derived
        key = id(derivation)
        outputs = self._held.get(key)
        if outputs is None:
            outputs = derivation.op.compute([self(s) for s in derivation.sources])
        left = self._wanted.get(key, 1) - 1
        if left > 0:
            self._wanted[key] = left
            self._held[key] = outputs
        else:
            self._held.pop(key, None)
            self._wanted.pop(key, None)
        return outputs[index]


def _planned_meta(spec: Spec, derived: tuple[Derivation, int], protos: dict[Spec, torch.Tensor]) -> torch.Tensor:
    """A planned output of ``spec`` that remembers ``derived``: a detached
    alias of the one meta tensor of that spec in ``protos`` (made on first
    use), several times cheaper to make than by torch.empty. A meta tensor
    holds no memory, so nothing can tie through an alias (alias_key and the
    writers tell meta tensors apart by identity)."""
    proto = protos.get(spec)
    if proto is None:
        proto = protos[spec] = torch.empty(spec[0], dtype=spec[1], device="meta")
    out = proto.detach()
    setattr(out, _DERIVED, derived)
    return out


def meta_outputs(derivation: Derivation, pending: bool, protos: dict[Spec, torch.Tensor]) -> list[Planned]:
    """The outputs of ``derivation``: pending, or meta tensors that remember it."""
    specs = derivation.outputs
    if pending:
        if len(specs) == 1:
            return [Pending(specs[0][0], specs[0][1], (derivation, 0))]
        return [Pending(shape, dtype, (derivation, i)) for i, (shape, dtype) in enumerate(specs)]
    return [_planned_meta(spec, (derivation, i), protos) for i, spec in enumerate(specs)]


def single_outputs(
    op: Op, sources: Iterable[tuple[Planned, ...]], plans: Iterable[list[Spec]], rule: str, pending: bool
) -> list[Planned]:
    """The one output of each of many groups (``sources``, planned to
    ``plans``): pending, or meta tensors that remember their derivation.
    Made in C: a map per column, no Python frame per group."""
    plans = list(plans)
    derivations = list(map(_NEW, repeat(Derivation), zip(repeat(op), sources, repeat(rule), plans)))
    specs = list(map(_FIRST, plans))
    derived = zip(derivations, repeat(0))
    if pending:  # (shape, dtype) + ((derivation, 0),)
        return list(map(_NEW, repeat(Pending), map(add, specs, zip(derived))))
    return list(_planned_metas(specs, derived))


def _planned_metas(specs: Sequence[Spec], derived: Iterable[tuple[Derivation, int]]) -> list[torch.Tensor]:
    """Planned outputs of ``specs``, each remembering its ``derived``: what
    :func:`_planned_meta` makes, for many at once."""
    protos = {spec: torch.empty(spec[0], dtype=spec[1], device="meta") for spec in dict.fromkeys(specs)}
    outs = list(map(_DETACH, map(protos.__getitem__, specs)))
    any(map(setattr, outs, repeat(_DERIVED), derived))  # setattr returns None: any() runs it on all
    return outs


def settle(tree: Any) -> Any:
    """``tree`` with every pending output a meta tensor and a
    :class:`Columns` a dict (the tree itself if it holds neither). Pending
    outputs are only ever values of a model state dict, alone or first of a
    ``(model, optim)`` pair."""
    if isinstance(tree, tuple) and len(tree) == 2:
        first, second = settle(tree[0]), settle(tree[1])
        return tree if first is tree[0] and second is tree[1] else (first, second)
    if type(tree) is Columns:
        values = list(tree.values)
        at, made = _settled(values)
        any(map(values.__setitem__, at, made))
        return dict(zip(tree.keys, values))
    if not isinstance(tree, Mapping):
        return tree
    at, made = _settled(list(tree.values()))
    if not at:
        return tree
    keys = list(tree)
    out = dict(tree)  # copied in C, then the settled values replaced
    out.update(zip(map(keys.__getitem__, at), made))
    return out


def _settled(values: list[Any]) -> tuple[list[int], list[torch.Tensor]]:
    """The positions of the pending outputs among ``values``, and the meta
    tensor each becomes: one per pending output, however many keys hold it."""
    at = list(compress(range(len(values)), map(is_, map(type, values), repeat(Pending))))
    if not at:
        return at, []
    pending = list(map(values.__getitem__, at))
    unique = list({id(p): p for p in pending}.values())
    made = _planned_metas(list(map(_SPEC, unique)), map(_DERIVATION, unique))
    if len(unique) < len(pending):
        by_id = dict(zip(map(id, unique), made))
        made = list(map(by_id.__getitem__, map(id, pending)))
    return at, made


# -- many groups at once --------------------------------------------------------

_SHAPE, _DTYPE, _IS_META = attrgetter("shape"), attrgetter("dtype"), attrgetter("is_meta")
_PLANNED = (torch.Tensor, Pending)
Plan = Callable[[Sequence[str], Sequence[Spec]], Optional[list[Spec]]]  # a rule's Op.plan, its errors reported


def _planned_specs(values: list[Any]) -> Optional[list[Spec]]:
    """The shape and dtype of each of ``values`` if every one is meta or
    pending (else None), read in C."""
    types = set(map(type, values))
    if types == {Pending}:
        return list(map(_SPEC, values))
    if not all(map(isinstance, values, repeat(_PLANNED))) or not all(map(_IS_META, values)):
        return None
    return list(zip(map(_SHAPE, values), map(_DTYPE, values)))


def plan_in_place(
    values: list[Any], keys: list[str], positions: list[int], op: Op, plan: Plan, rule: str, pending: bool
) -> Optional[list[Any]]:
    """``values`` (of a state dict, in order) with the values at
    ``positions`` (of the keys ``keys``, one group each, mapped to itself: a
    permute, a transpose) planned by ``op``, when every input is meta or
    pending (else None): the outputs (pending ones if ``pending``) made in
    bulk, one plan per shape and dtype."""
    inputs = list(map(values.__getitem__, positions))
    specs = _planned_specs(inputs)
    if specs is None:
        return None
    plans: dict[Spec, list[Spec]] = {}
    for spec in dict.fromkeys(specs):
        planned = plan([keys[positions[specs.index(spec)]]], [spec])
        if planned is None:
            return None  # the rule's general path says why
        plans[spec] = planned
    out = list(values)
    any(map(out.__setitem__, positions, single_outputs(op, zip(inputs), map(plans.__getitem__, specs), rule, pending)))
    return out


def plan_fused(
    keys: list[str], values: list[Any], members: list[tuple[str, ...]], positions: list[int],
    targets: list[str], op: Op, plan: Plan, rule: str, pending: bool,
) -> Optional[tuple[list[str], list[Any]]]:
    """The keys and values of a state dict (``keys``, ``values``) with each
    group of ``n`` keys (``members``, at ``positions`` in ``keys``, group
    after group) planned by ``op`` into one output under its target, in the
    place of its first member (a fuse), when every input is meta or pending
    (else None): the outputs (pending ones if ``pending``) made in bulk, one
    plan per set of input shapes and dtypes, the lists made in C. None too
    where a group plans several outputs or a target is a key already there
    (or made twice): the rule's general path handles those, naming the clash."""
    if not members:
        return None
    n = len(members[0])
    if any(len(m) != n for m in members):
        return None
    inputs = list(map(values.__getitem__, positions))
    specs = _planned_specs(inputs)
    if specs is None:
        return None
    given: list[tuple[Spec, ...]] = list(zip(*[iter(specs)] * n))
    plans: dict[tuple[Spec, ...], list[Spec]] = {}
    for spec in dict.fromkeys(given):
        planned = plan(members[given.index(spec)], spec)
        if planned is None or len(planned) != 1:
            return None
        plans[spec] = planned
    outputs = single_outputs(op, zip(*[iter(inputs)] * n), map(plans.__getitem__, given), rule, pending)
    out_keys, out_values, keep = list(keys), list(values), [True] * len(keys)
    firsts = positions[::n]
    # each output in its first member's place, the other members dropped (any() runs each map to its end)
    any(map(out_keys.__setitem__, firsts, targets))
    any(map(out_values.__setitem__, firsts, outputs))
    any(map(keep.__setitem__, compress(positions, cycle([False] + [True] * (n - 1))), repeat(False)))
    out_keys, out_values = list(compress(out_keys, keep)), list(compress(out_values, keep))
    made = set(targets)  # each target made once, and no key left in place already named like one
    if len(made) < len(targets) or made.intersection(keys).difference(chain.from_iterable(members)):
        return None
    return out_keys, out_values
