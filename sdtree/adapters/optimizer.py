"""Read and write optimizers' state dicts: ``get_optimizer_state_dict`` and
``set_optimizer_state_dict`` (torch's signatures and results).

``get``: walk (:func:`~sdtree.adapters.walk.index_model`) -> read each
optimizer (the model's IO: its own state and groups, or FSDP1's hooks; for
an optimizer with no state yet, the state one zero-lr step on zero grads
would create, computed on a shadow copy by
:mod:`sdtree.adapters.initial_state`, so the optimizer, its parameters and
their grads stay untouched) -> pipeline (merge, flatten, gather/offload).
``set``: walk -> the load flow of :mod:`sdtree.adapters.load` (normalize
and plan per optimizer, agree, bind, write).
"""

from __future__ import annotations

from typing import Any, Optional, Union

import torch
from torch import nn

from sdtree.adapters._common import as_optimizers, check_optim_not_empty, finish, public, warn_submodules
from sdtree.adapters.index import ModelIndex
from sdtree.adapters.load import load
from sdtree.adapters.walk import index_model
from sdtree.options import StateDictOptions, as_options
from sdtree.transforms import flatten_optimizer, merge_optimizers
from sdtree.types import StateDict

__all__ = [
    "Optimizers",
    "get_optimizer_state_dict",
    "set_optimizer_state_dict",
    "patch_optimizer_state_dict",
    "read_optimizers",
]

Optimizers = Union[torch.optim.Optimizer, "list[torch.optim.Optimizer]", "tuple[torch.optim.Optimizer, ...]"]


def read_optimizers(
    model: nn.Module, optims: tuple[torch.optim.Optimizer, ...], index: ModelIndex, options: StateDictOptions
) -> dict[str, Any]:
    """``get``'s steps after the walk: read each optimizer through the model's
    IO, merge them, flatten, gather and/or offload, as ``options`` say."""
    parts = [index.io.read_optimizer(model, optim, index) for optim in optims]
    osd: dict[str, Any] = parts[0] if len(parts) == 1 else merge_optimizers()(parts)
    if options.flatten_optimizer_state_dict:
        osd = flatten_optimizer()(osd)
    osd = finish(full=options.full_state_dict, cpu_offload=options.cpu_offload)(osd)
    check_optim_not_empty(osd, options)
    return osd


@public
def get_optimizer_state_dict(
    model: nn.Module,
    optimizers: Optimizers,
    *,
    submodules: Optional[set[nn.Module]] = None,
    options: Optional[StateDictOptions] = None,
) -> dict[str, Any]:
    """Return the state dict of ``optimizers``, keyed by canonical FQNs.

    Same signature and results as torch's ``get_optimizer_state_dict``, but
    neither the optimizers nor the parameters (values, grads) change: an
    optimizer with no state yet reports the state one zero-lr step on zero
    grads would create, computed on a shadow copy.
    """
    opts = as_options(options)
    warn_submodules(submodules)
    return read_optimizers(model, as_optimizers(optimizers), index_model(model, opts.dsd_fqn_modifiers), opts)


@public
def set_optimizer_state_dict(
    model: nn.Module,
    optimizers: Optimizers,
    optim_state_dict: StateDict,
    *,
    options: Optional[StateDictOptions] = None,
) -> None:
    """Load ``optim_state_dict`` (keyed by canonical FQNs, nested or flat, or
    by parameter ids) into ``optimizers``.

    Same signature and results as torch's ``set_optimizer_state_dict``, but no
    step is taken, the given dict is never changed (values are copied, not
    aliased), and all optimizers are checked before the first write: a
    failing call leaves every optimizer as it was.

    Raises:
        IncompatibleStateDictError (a RuntimeError): missing state under
            ``strict``, state of the wrong shape, groups that do not match.
    """
    opts = as_options(options)
    optims = as_optimizers(optimizers)
    check_optim_not_empty(optim_state_dict, opts)
    index = index_model(model, opts.dsd_fqn_modifiers)
    load(model, index, optims, None, optim_state_dict, opts)


def patch_optimizer_state_dict(
    model: nn.Module,
    *,
    optimizers: tuple[torch.optim.Optimizer, ...],
    options: Optional[StateDictOptions] = None,
) -> None:
    """Make each optimizer's ``state_dict()`` / ``load_state_dict(sd)`` call
    :func:`get_optimizer_state_dict` / :func:`set_optimizer_state_dict`."""
    optims = as_optimizers(optimizers)

    def state_dict(*args: Any, **kwargs: Any) -> dict[str, Any]:
        return get_optimizer_state_dict(model, optims, options=options)

    def load_state_dict(state_dict: dict[str, Any], *args: Any, **kwargs: Any) -> None:
        set_optimizer_state_dict(model, optims, state_dict, options=options)

    for optim in optims:
        optim.state_dict = state_dict  # type: ignore[method-assign]
        optim.load_state_dict = load_state_dict  # type: ignore[method-assign]
