"""``get_state_dict`` / ``set_state_dict``: model and optimizers together,
off one walk of the model (see :mod:`sdtree.adapters.module`,
:mod:`sdtree.adapters.optimizer` and, for a set, :mod:`sdtree.adapters.load`)."""

from __future__ import annotations

from typing import Any, Optional

from torch import nn
from torch.nn.modules.module import _IncompatibleKeys

from sdtree.adapters._common import as_optimizers, check_optim_not_empty, public, warn_submodules
from sdtree.adapters.load import load
from sdtree.adapters.model_plan import module_keyed_to_fqns
from sdtree.adapters.module import read_model
from sdtree.adapters.optimizer import Optimizers, read_optimizers
from sdtree.adapters.walk import index_model
from sdtree.options import StateDictOptions, as_options
from sdtree.types import StateDict

__all__ = ["get_state_dict", "set_state_dict"]


@public
def get_state_dict(
    model: nn.Module,
    optimizers: Optimizers,
    *,
    submodules: Optional[set[nn.Module]] = None,
    options: Optional[StateDictOptions] = None,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Return ``(model state dict, optimizers' state dict)``, keyed by canonical FQNs.

    Same signature and results as torch's ``get_state_dict``; nothing is
    changed. See :func:`get_model_state_dict` and :func:`get_optimizer_state_dict`.
    """
    opts = as_options(options)
    warn_submodules(submodules)
    index = index_model(model, opts.dsd_fqn_modifiers)
    model_state_dict = read_model(model, index, opts, submodules)
    optim_state_dict = read_optimizers(model, as_optimizers(optimizers), index, opts)
    return model_state_dict, optim_state_dict


@public
def set_state_dict(
    model: nn.Module,
    optimizers: Optimizers,
    *,
    model_state_dict: StateDict,
    optim_state_dict: StateDict,
    options: Optional[StateDictOptions] = None,
) -> _IncompatibleKeys:
    """Load a model state dict and an optimizers' state dict.

    Same signature and results as torch's ``set_state_dict``. Both are
    checked before either is written: a failing call changes nothing. With
    ``broadcast_from_rank0``, both are announced in one metadata broadcast.

    Returns:
        The model's ``missing_keys`` and ``unexpected_keys``.
    """
    opts = as_options(options)
    optims = as_optimizers(optimizers)
    index = index_model(model, opts.dsd_fqn_modifiers)
    state_dict = module_keyed_to_fqns(model_state_dict, index)
    check_optim_not_empty(optim_state_dict, opts)
    return load(model, index, optims, state_dict, optim_state_dict, opts)
