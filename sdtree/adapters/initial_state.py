"""The state an optimizer with no state yet reports: what one zero-lr step on
zero grads creates (torch's ``_init_optim_state``), computed on a shadow
copy, so that the optimizer, its parameters and their grads stay untouched.
"""

from __future__ import annotations

import copy
from collections import OrderedDict, defaultdict
from typing import Any

import torch

from sdtree.types import PARAMS

__all__ = ["needs_initial_state", "shadow_initial_state", "with_initial_state"]


def needs_initial_state(optim: torch.optim.Optimizer) -> bool:
    """Whether ``optim`` has no state yet and no gradient to make one: torch
    then reports the state one step would create."""
    return not optim.state and not any(p.grad is not None for g in optim.param_groups for p in g[PARAMS])


def shadow_initial_state(optim: torch.optim.Optimizer) -> dict[int, Any]:
    """The state one zero-lr step on zero grads creates, keyed by parameter
    position, computed on copies: ``optim`` and its parameters are not touched."""
    params = [p for group in optim.param_groups for p in group[PARAMS]]
    clones = {}
    for p in params:
        if id(p) not in clones:
            clone = p.detach().clone().requires_grad_(p.requires_grad)
            if p.requires_grad:
                clone.grad = torch.zeros_like(clone)
            clones[id(p)] = clone
    shadow = copy.copy(optim)
    shadow.param_groups = []
    for group in optim.param_groups:
        new = dict(group)
        new[PARAMS] = [clones[id(p)] for p in group[PARAMS]]
        if "lr" in new:
            new["lr"] = torch.tensor(0.0) if isinstance(new["lr"], torch.Tensor) else 0.0
        shadow.param_groups.append(new)
    shadow.state = defaultdict(dict)
    shadow._optimizer_step_pre_hooks = OrderedDict()
    shadow._optimizer_step_post_hooks = OrderedDict()
    type(optim).step(shadow)
    position: dict[int, int] = {}
    for p in params:
        position.setdefault(id(clones[id(p)]), len(position))
    return {position[id(k)]: v for k, v in shadow.state.items() if id(k) in position}


def with_initial_state(optim: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """A view of ``optim`` holding the state one zero-lr step would create
    (:func:`shadow_initial_state`), keyed by its own parameters; ``optim``
    itself is not touched."""
    params = list(dict.fromkeys(p for group in optim.param_groups for p in group[PARAMS]))
    view = copy.copy(optim)
    view.state = defaultdict(dict, {params[i]: s for i, s in shadow_initial_state(optim).items()})
    return view
