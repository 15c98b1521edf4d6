"""Transforms over a combined checkpoint, ``{"model": ..., "optim": ..., ...}``.

A transform applied to a combined checkpoint as a whole would see the keys
``"model"`` and ``"optim"``, not the FQNs inside them: a key rule would match
nothing there. These combinators say where it applies instead:

- :func:`at` applies a transform to one entry;
- :func:`each` applies it to the model and to every optimizer state dict
  keyed by FQNs, each optimizer together with the model (as a
  ``(model, optim)`` pair), so tensor transforms move the optimizer's moments
  with their parameters and key transforms rename both alike. Other entries
  (a scheduler, a step count) are kept as they are.

Both return new containers; entries they do not touch are shared.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import attrs

from sdtree.errors import LayoutMismatchError, NotAMappingError, preview as _preview
from sdtree.types import PARAMS, PG, STATE, is_flat_optim_state_dict, is_optim_state_dict
from sdtree.transforms.compose import Transform, pipeline_steps

__all__ = ["at", "each", "MODEL", "OPTIM", "is_combined", "optimizer_entries", "acts_on_combined"]

MODEL = "model"
OPTIM = "optim"


def is_combined(tree: Any) -> bool:
    """Whether ``tree`` is ``{"model": {...}, ...}``."""
    return isinstance(tree, Mapping) and isinstance(tree.get(MODEL), Mapping)


def _keyed_by_fqns(optim: Any) -> bool:
    """Whether an optimizer state dict names its parameters (FQNs), not ids."""
    if not is_optim_state_dict(optim):
        return isinstance(optim, Mapping)
    keys = list(optim[STATE]) + [k for group in optim[PG] for k in group.get(PARAMS, ())]
    return all(type(k) is str for k in keys)


def optimizer_entries(tree: Mapping[str, Any]) -> list[str]:
    """The entries of a combined checkpoint that are optimizer state dicts
    keyed by FQNs (``"optim"``, and any other name a trainer gives one), in order."""
    return [
        key
        for key, value in tree.items()
        if key != MODEL
        and (key == OPTIM or is_optim_state_dict(value) or (isinstance(value, Mapping) and is_flat_optim_state_dict(value)))
        and _keyed_by_fqns(value)
    ]


@attrs.frozen(repr=False)
class _At(Transform):
    _factory = "at"
    key: str
    transform: Transform

    def __call__(self, state_dict: Any, /) -> Any:
        if not isinstance(state_dict, Mapping):
            raise NotAMappingError(f"{self!r}: expected a mapping with an entry {self.key!r}, got {type(state_dict).__name__}.")
        if self.key not in state_dict:
            raise LayoutMismatchError(
                f"{self!r}: there is no entry {self.key!r} to transform (entries: {_preview(state_dict)})."
            )
        return {**state_dict, self.key: self.transform(state_dict[self.key])}

    def inverse(self) -> Transform:
        return _At(self.key, self.transform.inverse())


def at(key: str, transform: Transform) -> Transform:
    """Return a transform that applies ``transform`` to the entry ``key`` and
    keeps the others.

    >>> from sdtree.transforms import add_prefix
    >>> at("model", add_prefix("net."))({"model": {"w": 1}, "step": 3})
    {'model': {'net.w': 1}, 'step': 3}

    Raises (when applied):
        LayoutMismatchError: there is no entry ``key``.
    """
    if not isinstance(transform, Transform):
        raise TypeError(f"at: transform must be a Transform, got {transform!r}.")
    return _At(key, transform)


@attrs.frozen(repr=False)
class _Each(Transform):
    _factory = "each"
    transform: Transform

    def __call__(self, state_dict: Any, /) -> Any:
        if not is_combined(state_dict):
            found = f"entries {_preview(state_dict)}" if isinstance(state_dict, Mapping) else type(state_dict).__name__
            raise LayoutMismatchError(
                f"{self!r}: expected a combined checkpoint {{{MODEL!r}: model_state_dict, ...}}, found {found}. "
                "Apply the transform itself to a lone state dict."
            )
        t = self.transform
        out = dict(state_dict)
        optims = optimizer_entries(state_dict)
        if not optims:
            out[MODEL] = t(state_dict[MODEL])
            return out
        for i, key in enumerate(optims):
            model, optim = t((state_dict[MODEL], state_dict[key]))
            if i == 0:
                out[MODEL] = model
            out[key] = optim
        return out

    def inverse(self) -> Transform:
        return _Each(self.transform.inverse())


def each(transform: Transform) -> Transform:
    """Return a transform that applies ``transform`` to the model of a
    combined checkpoint and to each of its optimizer state dicts keyed by
    FQNs, each optimizer as a ``(model, optim)`` pair with the model, so
    that the optimizer follows its parameters. Other entries are kept.

    >>> from sdtree.transforms import strip_prefix
    >>> ckpt = {"model": {"m.w": 1}, "optim": {"state": {"m.w": {"step": 1}}, "param_groups": [{"params": ["m.w"]}]}}
    >>> each(strip_prefix("m."))(ckpt)["optim"]["param_groups"]
    [{'params': ['w']}]

    Raises (when applied):
        LayoutMismatchError: the state dict has no ``"model"`` entry.
    """
    if not isinstance(transform, Transform):
        raise TypeError(f"each: transform must be a Transform, got {transform!r}.")
    return _Each(transform)


def acts_on_combined(transform: Transform) -> bool:
    """Whether ``transform`` is written for a combined checkpoint: an
    :func:`at` or :func:`each`, or a pipeline with one among its steps.

    >>> from sdtree.transforms import strip_prefix
    >>> acts_on_combined(each(strip_prefix("m."))), acts_on_combined(strip_prefix("m."))
    (True, False)
    """
    return any(isinstance(step, (_At, _Each)) for step in pipeline_steps(transform))
