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
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
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


class Pending:
    """A planned output inside a pipeline, not yet a meta tensor: its shape,
    dtype and ``(derivation, index)``. Tensor rules and key transforms take
    it as they take a meta tensor; :func:`settle` makes it one."""

    __slots__ = ("shape", "dtype", _DERIVED, "_settled")
    is_meta = True  # what _run asks of every input

    def __init__(self, shape: tuple[int, ...], dtype: torch.dtype, derived: tuple[Derivation, int]) -> None:
        self.shape = shape
        self.dtype = dtype
        setattr(self, _DERIVED, derived)
        self._settled: Optional[torch.Tensor] = None

    def __repr__(self) -> str:
        return f"Pending({tuple(self.shape)}, {self.dtype})"


Planned = Union[torch.Tensor, Pending]  # a derivation's source


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


def _proto(spec: Spec, protos: dict[Spec, torch.Tensor]) -> torch.Tensor:
    """The meta tensor of ``spec`` whose detached aliases are the planned
    outputs of that spec: several times cheaper to make than by torch.empty,
    and a meta tensor holds no memory, so nothing can tie through an alias
    (alias_key and the writers tell meta tensors apart by identity)."""
    proto = protos[spec] = torch.empty(spec[0], dtype=spec[1], device="meta")
    return proto


def meta_outputs(derivation: Derivation, pending: bool, protos: dict[Spec, torch.Tensor]) -> list[Planned]:
    """The outputs of ``derivation``: pending, or meta tensors that remember it."""
    specs = derivation.outputs
    if pending:
        if len(specs) == 1:
            return [Pending(specs[0][0], specs[0][1], (derivation, 0))]
        return [Pending(shape, dtype, (derivation, i)) for i, (shape, dtype) in enumerate(specs)]
    outputs: list[Planned] = []
    for i, spec in enumerate(specs):
        proto = protos.get(spec)
        out = (_proto(spec, protos) if proto is None else proto).detach()
        setattr(out, _DERIVED, (derivation, i))
        outputs.append(out)
    return outputs


def _settle_one(value: Pending, protos: dict[Spec, torch.Tensor]) -> torch.Tensor:
    settled = value._settled
    if settled is None:  # one meta tensor per pending output, however many keys hold it
        spec = (value.shape, value.dtype)
        proto = protos.get(spec)
        settled = value._settled = (_proto(spec, protos) if proto is None else proto).detach()
        setattr(settled, _DERIVED, getattr(value, _DERIVED))
    return settled


def settle(tree: Any) -> Any:
    """``tree`` with every pending output a meta tensor (the tree itself if
    it holds none). Pending outputs are only ever values of a model state
    dict, alone or first of a ``(model, optim)`` pair."""
    if isinstance(tree, tuple) and len(tree) == 2:
        first, second = settle(tree[0]), settle(tree[1])
        return tree if first is tree[0] and second is tree[1] else (first, second)
    if not isinstance(tree, Mapping):
        return tree
    protos: dict[Spec, torch.Tensor] = {}
    out: Optional[dict[Any, Any]] = None
    for key, value in tree.items():
        if type(value) is Pending:
            if out is None:
                out = dict(tree)
            out[key] = _settle_one(value, protos)
    return tree if out is None else out
