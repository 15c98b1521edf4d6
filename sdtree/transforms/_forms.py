"""Recognise the three forms a key transform applies to.

- a *model* state dict: ``{fqn: leaf}``;
- an *optimizer* state dict: exactly the keys ``"state"`` (a mapping) and
  ``"param_groups"`` (a list);
- a *flat optimizer* state dict: a non-empty mapping whose keys all start
  with ``"state."`` or ``"param_groups."``, at least one with the latter.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

from sdtree.errors import NotAMappingError

STATE = "state"
PG = "param_groups"
PARAMS = "params"
STATE_DOT = "state."
PG_DOT = "param_groups."

Form = Literal["model", "optim", "flat_optim"]


def is_optim_state_dict(obj: Any) -> bool:
    return (
        isinstance(obj, Mapping)
        and len(obj) == 2
        and STATE in obj
        and PG in obj
        and isinstance(obj[STATE], Mapping)
        and isinstance(obj[PG], (list, tuple))
    )


def is_flat_optim_state_dict(obj: Mapping[Any, Any]) -> bool:
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
