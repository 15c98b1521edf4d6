"""The shapes sdtree works on, and how to tell them apart.

A *model state dict* maps keys to leaves: ``{"layer.weight": tensor, ...}``.
Keys are *FQNs* (fully qualified names): the dotted path of a parameter or
buffer in the unwrapped model, with wrapper segments such as ``module.`` or
``_orig_mod.`` removed.

An *optimizer state dict* is ``{"state": {key: {name: leaf}}, "param_groups":
[{"params": [key, ...], **hyper_parameters}]}`` where ``key`` is the ``int``
that ``Optimizer.state_dict()`` gives, or an FQN ``str``. Its *flat* form
(torch's ``flatten_optimizer_state_dict``) maps ``"state.<fqn>.<name>"`` and
``"param_groups.<fqn>.<hyper>"`` to leaves (see :mod:`sdtree.fqn` for how
such keys split).

:func:`form_of` tells the three apart: an optimizer state dict has exactly
the keys ``"state"`` (a mapping) and ``"param_groups"`` (a list); a flat one
is a non-empty mapping whose keys all start with ``"state."`` or
``"param_groups."``, at least one with the latter; anything else is a model
state dict.

Dict order is part of a state dict's value for sdtree: every transform keeps
the order of the keys it is given.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal, TypedDict, Union

from sdtree.errors import NotAMappingError

__all__ = [
    "Key",
    "StateDict",
    "FlatOptimStateDict",
    "ParamGroup",
    "OptimStateDict",
    "Form",
    "STATE",
    "PG",
    "PARAMS",
    "STATE_DOT",
    "PG_DOT",
    "is_optim_state_dict",
    "is_flat_optim_state_dict",
    "form_of",
]

Key = Union[int, str]
StateDict = Mapping[str, Any]  # a model state dict
FlatOptimStateDict = Mapping[str, Any]  # "state.<fqn>.<name>" / "param_groups.<fqn>.<hyper>" -> leaf
ParamGroup = dict[str, Any]


class OptimStateDict(TypedDict):
    """An unflattened optimizer state dict."""

    state: dict[Key, dict[str, Any]]
    param_groups: list[ParamGroup]


Form = Literal["model", "optim", "flat_optim"]

STATE = "state"
PG = "param_groups"
PARAMS = "params"
STATE_DOT = "state."
PG_DOT = "param_groups."


def is_optim_state_dict(obj: Any) -> bool:
    """Whether ``obj`` is an (unflattened) optimizer state dict."""
    return (
        isinstance(obj, Mapping)
        and len(obj) == 2
        and STATE in obj
        and PG in obj
        and isinstance(obj[STATE], Mapping)
        and isinstance(obj[PG], (list, tuple))
    )


def is_flat_optim_state_dict(obj: Mapping[Any, Any]) -> bool:
    """Whether the mapping ``obj`` is a flat optimizer state dict."""
    if not obj:
        return False
    has_group = False
    for key in obj:
        if type(key) is not str:
            return False
        if key.startswith(PG_DOT):
            has_group = True
        elif not key.startswith(STATE_DOT):
            return False
    return has_group


def form_of(obj: Any, fn: str) -> Form:
    """The form of the state dict ``obj``; ``fn`` names the caller in the error.

    Raises:
        NotAMappingError: ``obj`` is not a mapping.
    """
    if not isinstance(obj, Mapping):
        raise NotAMappingError(
            f"{fn}: expected a state dict (a Mapping), got {type(obj).__name__}. "
            "Pass model.state_dict() or optim.state_dict(), not the module or optimizer."
        )
    if is_optim_state_dict(obj):
        return "optim"
    if is_flat_optim_state_dict(obj):
        return "flat_optim"
    return "model"
