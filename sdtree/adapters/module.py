"""Read and write a model's state dict: ``get_model_state_dict`` and
``set_model_state_dict`` (torch's signatures and results).

``get``: walk (:func:`~sdtree.adapters.walk.index_model`) -> read (the
model's IO: off the index's entries, or ``model.state_dict()``, or FSDP1's
hooks) -> pipeline (:func:`model_pipeline`: submodule selection, frozen
parameters, gather/offload). ``set``: walk -> the load flow of
:mod:`sdtree.adapters.load` (plan, agree, bind, write).
"""

from __future__ import annotations

import re
from typing import Any, Optional

from torch import nn
from torch.nn.modules.module import _IncompatibleKeys

from sdtree.adapters._common import check_model_not_empty, finish, public, warn_submodules
from sdtree.adapters.index import ModelIndex
from sdtree.adapters.load import load
from sdtree.adapters.model_plan import module_keyed_to_fqns
from sdtree.adapters.walk import index_model
from sdtree.options import StateDictOptions, as_options
from sdtree.transforms import Transform, drop_keys, identity, rename, select_keys
from sdtree.types import StateDict

__all__ = ["get_model_state_dict", "set_model_state_dict", "patch_model_state_dict", "read_model", "model_pipeline"]


def model_pipeline(
    *,
    frozen: Optional[frozenset[str]],
    submodule_prefixes: Optional[list[str]],
    keep_submodule_prefixes: bool,
    full: bool,
    cpu_offload: bool,
) -> Transform:
    """The pure steps from the canonical state dict to what ``get`` returns:
    keep the submodules' entries, drop the ``frozen`` FQNs (``None``: keep
    them), gather and/or offload."""
    t = identity()
    if submodule_prefixes is not None:
        prefixes = submodule_prefixes
        t = t >> select_keys(*prefixes) if prefixes else t >> select_keys(where=lambda _: False)
        if prefixes and not keep_submodule_prefixes:
            t = t >> rename([("^(?:" + "|".join(map(re.escape, prefixes)) + ")", "")])
    if frozen:
        t = t >> drop_keys(where=frozen.__contains__)
    return t >> finish(full=full, cpu_offload=cpu_offload)


def read_model(model: nn.Module, index: ModelIndex, options: StateDictOptions, submodules: Any = None) -> dict[str, Any]:
    """``get``'s steps after the walk: read the model through its IO, then
    :func:`model_pipeline` as ``options`` say."""
    raw = index.io.read_model(model, index)
    prefixes = None
    if submodules:
        wanted = {id(m) for m in submodules}
        prefixes = list(dict.fromkeys(fqn for _, fqn, module in index.modules if id(module) in wanted))
    pipeline = model_pipeline(
        frozen=index.frozen if options.ignore_frozen_params else None,
        submodule_prefixes=prefixes,
        keep_submodule_prefixes=options.keep_submodule_prefixes,
        full=options.full_state_dict,
        cpu_offload=options.cpu_offload,
    )
    state_dict: dict[str, Any] = pipeline(raw)
    check_model_not_empty(state_dict, options, loading=False)
    return state_dict


@public
def get_model_state_dict(
    model: nn.Module,
    *,
    submodules: Optional[set[nn.Module]] = None,
    options: Optional[StateDictOptions] = None,
) -> dict[str, Any]:
    """Return the model state dict of ``model``, keyed by canonical FQNs.

    Same signature and results as torch's ``get_model_state_dict``; the model
    is only read.

    Args:
        model: the model, possibly wrapped (DDP, FSDP1, ``torch.compile``,
            activation checkpointing) or sharded (FSDP2, tensor parallel).
        submodules: deprecated; keep only these submodules' entries.
        options: a :class:`StateDictOptions` (sdtree's or torch's).
    """
    opts = as_options(options)
    warn_submodules(submodules)
    return read_model(model, index_model(model, opts.dsd_fqn_modifiers), opts, submodules)


@public
def set_model_state_dict(
    model: nn.Module,
    model_state_dict: StateDict,
    *,
    options: Optional[StateDictOptions] = None,
) -> _IncompatibleKeys:
    """Load ``model_state_dict`` (keyed by canonical FQNs) into ``model``.

    Same signature and results as torch's ``set_model_state_dict``, but the
    given dict is never changed, and every key, shape and dtype is checked
    before the first write: a failing call leaves the model as it was.

    Returns:
        ``missing_keys`` and ``unexpected_keys`` (canonical FQNs).

    Raises:
        IncompatibleStateDictError (a RuntimeError): under ``strict``, a
            missing or unexpected key; always, a value of the wrong shape,
            kind of dtype, or type.
    """
    opts = as_options(options)
    index = index_model(model, opts.dsd_fqn_modifiers)
    state_dict = module_keyed_to_fqns(model_state_dict, index)
    check_model_not_empty(state_dict, opts, loading=True)
    if not state_dict and not opts.broadcast_from_rank0:
        return _IncompatibleKeys([], [])
    return load(model, index, (), state_dict, None, opts)


def patch_model_state_dict(model: nn.Module, *, options: Optional[StateDictOptions] = None) -> None:
    """Make ``model.state_dict()`` / ``model.load_state_dict(sd)`` call
    :func:`get_model_state_dict` / :func:`set_model_state_dict` with ``options``."""

    def state_dict(*args: Any, **kwargs: Any) -> dict[str, Any]:
        return get_model_state_dict(model, options=options)

    def load_state_dict(state_dict: dict[str, Any], *args: Any, **kwargs: Any) -> _IncompatibleKeys:
        return set_model_state_dict(model, state_dict, options=options)

    model.state_dict = state_dict  # type: ignore[method-assign,assignment]
    model.load_state_dict = load_state_dict  # type: ignore[method-assign,assignment]
