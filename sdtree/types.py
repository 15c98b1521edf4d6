"""The shapes sdtree works on.

A *model state dict* maps keys to leaves: ``{"layer.weight": tensor, ...}``.
Keys are *FQNs* (fully qualified names): the dotted path of a parameter or
buffer in the unwrapped model, with wrapper segments such as ``module.`` or
``_orig_mod.`` removed.

An *optimizer state dict* is ``{"state": {key: {name: leaf}}, "param_groups":
[{"params": [key, ...], **hyper_parameters}]}`` where ``key`` is the ``int``
that ``Optimizer.state_dict()`` gives, or an FQN ``str``. Its *flat* form
(torch's ``flatten_optimizer_state_dict``) maps ``"state.<fqn>.<name>"`` and
``"param_groups.<fqn>.<hyper>"`` to leaves.

Dict order is part of a state dict's value for sdtree: every transform keeps
the order of the keys it is given.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, TypedDict, Union

__all__ = ["Key", "StateDict", "ParamGroup", "OptimStateDict"]

Key = Union[int, str]
StateDict = Mapping[str, Any]
ParamGroup = dict[str, Any]


class OptimStateDict(TypedDict):
    """An unflattened optimizer state dict."""

    state: dict[Key, dict[str, Any]]
    param_groups: list[ParamGroup]
