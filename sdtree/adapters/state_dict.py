"""``get_state_dict`` / ``set_state_dict``: model and optimizers together."""

from __future__ import annotations

from typing import Any, Optional

from torch import nn
from torch.nn.modules.module import _IncompatibleKeys

from sdtree.adapters._common import agree, announce_load, as_optimizers, check_optim_not_empty, without_gc
from sdtree.adapters.index import index_model
from sdtree.adapters.module import (
    ModelPlan,
    deliver_model,
    get_model_state_dict,
    module_keyed_to_fqns,
    plan_model_load,
    write_model,
)
from sdtree.adapters.optimizer import (
    OptimPlan,
    Optimizers,
    deliver_optimizers,
    get_optimizer_state_dict,
    optimizers_sharded,
    plan_optimizers_load,
    write_optimizers,
)
from sdtree.options import StateDictOptions, as_options

__all__ = ["get_state_dict", "set_state_dict"]


@without_gc
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
    model_state_dict = get_model_state_dict(model, submodules=submodules, options=options)
    optim_state_dict = get_optimizer_state_dict(model, optimizers, options=options)
    return model_state_dict, optim_state_dict


@without_gc
def set_state_dict(
    model: nn.Module,
    optimizers: Optimizers,
    *,
    model_state_dict: dict[str, Any],
    optim_state_dict: dict[str, Any],
    options: Optional[StateDictOptions] = None,
) -> _IncompatibleKeys:
    """Load a model state dict and an optimizers' state dict.

    Same signature and results as torch's ``set_state_dict``. Both are
    checked before either is written: a failing call changes nothing.

    Returns:
        The model's ``missing_keys`` and ``unexpected_keys``.
    """
    opts = as_options(options)
    optims = as_optimizers(optimizers)
    index = index_model(model, opts.dsd_fqn_modifiers)
    state_dict = module_keyed_to_fqns(model_state_dict, index)
    check_optim_not_empty(optim_state_dict, opts)
    fn = "set_state_dict"
    planned, announced = announce_load(state_dict, opts, fn)
    planned_optim, announced_optim = announce_load(optim_state_dict, opts, fn)

    def plan_both() -> tuple[Optional[ModelPlan], list[OptimPlan]]:
        model_plan = plan_model_load(index, planned, opts, fn) if planned else None
        return model_plan, plan_optimizers_load(index, optims, planned_optim, opts)

    distributed = opts.broadcast_from_rank0 or index.distributed or optimizers_sharded(optims)
    model_plan, optim_plans = agree(fn, distributed, plan_both)
    if announced is not None and announced_optim is not None:
        optim_plans = deliver_optimizers(index, optims, announced_optim, opts)
        if model_plan is not None:
            # not into the parameters: the model is written after the optimizers,
            # so that a failing optimizer write leaves the model as it was
            model_plan = deliver_model(index, announced, model_plan, in_place=False)
    write_optimizers(model, optims, optim_plans, index)
    if model_plan is None:
        return _IncompatibleKeys([], [])
    write_model(model, index, model_plan)
    return _IncompatibleKeys(model_plan.missing, model_plan.unexpected)
