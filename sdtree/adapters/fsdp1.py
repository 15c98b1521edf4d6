"""FSDP1 (``FullyShardedDataParallel``): the reads and writes that go through
FSDP's own state-dict hooks.

FSDP1 keeps the parameters of each wrapped module in one flat parameter
(sharded across ranks), so only FSDP can expand it to the original FQNs.
sdtree asks FSDP for the *sharded* state dict (``ShardedTensor`` values, as
torch's ``get_state_dict`` returns by default) and, for a full state dict,
gathers it itself (:func:`~sdtree.transforms.gather_dtensors`): torch's own
full-state-dict path with ``offload_to_cpu`` crashes on CPU. Loads are
validated by the same plans as every other model, against the full shapes
the index records, and only then handed to FSDP.

Collective: every function here runs FSDP collectives; call on every rank.
"""

from __future__ import annotations

import contextlib
import copy
import warnings
from collections import defaultdict
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import nn

from sdtree._tree import tree_flatten, tree_map
from sdtree.adapters.index import ModelIndex
from sdtree.transforms import rename
from sdtree.transforms._forms import PARAMS, PG, STATE
from sdtree.transforms.distributed import gather_dtensors
from sdtree.transforms.tensors import is_sharded_tensor

__all__ = ["read_model", "read_optimizer", "logical_optimizer", "write_model", "write_optimizer"]


@contextlib.contextmanager
def _state_dict_type(model: nn.Module, *, full: bool) -> Iterator[None]:
    """FSDP's sharded (or full, unoffloaded, on every rank) state-dict mode."""
    from torch.distributed.fsdp import (
        FullOptimStateDictConfig,
        FullStateDictConfig,
        FullyShardedDataParallel,
        ShardedOptimStateDictConfig,
        ShardedStateDictConfig,
        StateDictType,
    )

    if full:
        settings: tuple[Any, ...] = (
            StateDictType.FULL_STATE_DICT,
            FullStateDictConfig(offload_to_cpu=False, rank0_only=False),
            FullOptimStateDictConfig(offload_to_cpu=False, rank0_only=False),
        )
    else:
        settings = (StateDictType.SHARDED_STATE_DICT, ShardedStateDictConfig(), ShardedOptimStateDictConfig())
    with warnings.catch_warnings():
        # FSDP deprecates state_dict_type() in favour of these very functions:
        # the warning is not the caller's to act on (torch's DSD hides it too)
        warnings.filterwarnings("ignore", message="FSDP.state_dict_type", category=FutureWarning)
        with FullyShardedDataParallel.state_dict_type(model, *settings):
            yield


def _fqn_to_key(index: ModelIndex) -> dict[str, str]:
    return {fqn: key for key, fqn in index.key_to_fqn.items() if key != fqn}


def read_model(model: nn.Module, index: ModelIndex) -> dict[str, Any]:
    """The model's sharded state dict (``ShardedTensor`` parameters), keyed by canonical FQNs."""
    with _state_dict_type(model, full=False):
        raw = type(model).state_dict(model)
    state_dict: dict[str, Any] = rename(dict(index.key_to_fqn))(raw)
    return state_dict


def _with_initial_state(optim: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """A view of ``optim`` holding the state one zero-lr step would create
    (see ``_shadow_initial_state``); ``optim`` itself is not touched."""
    from sdtree.adapters.optimizer import _shadow_initial_state

    params = list(dict.fromkeys(p for group in optim.param_groups for p in group[PARAMS]))
    view = copy.copy(optim)
    view.state = defaultdict(dict, {params[i]: s for i, s in _shadow_initial_state(optim).items()})
    return view


def read_optimizer(model: nn.Module, optim: torch.optim.Optimizer, index: ModelIndex) -> dict[str, Any]:
    """``optim``'s sharded state dict, expanded by FSDP to the original
    parameters and keyed by canonical FQNs. An optimizer with no state yet
    reports its initial state, computed on a shadow copy (no step)."""
    from torch.distributed.fsdp import FullyShardedDataParallel

    from sdtree.adapters.optimizer import needs_initial_state

    source = _with_initial_state(optim) if needs_initial_state(optim) else optim
    # the class's state_dict, not the instance's: patch_optimizer_state_dict
    # makes that one call back here
    raw = type(source).state_dict(source)
    with _state_dict_type(model, full=False):
        osd = FullyShardedDataParallel.optim_state_dict(model, source, optim_state_dict=raw)
    named: dict[str, Any] = rename(dict(index.key_to_fqn))(osd)
    return named


def logical_optimizer(optim: torch.optim.Optimizer, index: ModelIndex) -> torch.optim.Optimizer:
    """A view of ``optim`` as the plans see other optimizers: each flat
    parameter replaced by the full-shape stand-ins of the parameters it
    holds (each parameter shard likewise), in FSDP's order, and no state.

    Only read by the load plans; never stepped or written.
    """
    groups = []
    for group in optim.param_groups:
        params: list[torch.Tensor] = []
        for param in group[PARAMS]:
            fqns = index.flat.get(id(param))
            if fqns is None:  # use_orig_params=True: the original parameter
                fqn = index.params.fqn_of_param(param)
                fqns = (fqn,) if fqn is not None else ()
            params.extend(index.entries[fqn].value for fqn in fqns)
        groups.append({**group, PARAMS: params})
    view = copy.copy(optim)
    view.param_groups = groups
    view.state = defaultdict(dict)
    return view


def _any_sharded(tree: Any) -> bool:
    leaves, _ = tree_flatten(tree)
    return any(is_sharded_tensor(leaf) for leaf in leaves)


def write_model(model: nn.Module, index: ModelIndex, values: Mapping[str, Any]) -> None:
    """Load validated ``values`` (canonical FQN -> value) through FSDP: a
    sharded state dict (``ShardedTensor`` parameters) as such, anything else
    as a full one (DTensors gathered first)."""
    raw = rename(_fqn_to_key(index))(dict(values))
    sharded = _any_sharded(raw)
    if not sharded:
        raw = gather_dtensors()(raw)
    with _state_dict_type(model, full=not sharded):
        type(model).load_state_dict(model, raw, strict=False)


def write_optimizer(model: nn.Module, optim: torch.optim.Optimizer, index: ModelIndex, osd: Mapping[str, Any]) -> None:
    """Load a validated FQN-keyed optimizer state dict through FSDP, which
    flattens and shards it into ``optim``'s parameters; the values ``optim``
    keeps are copies (the caller's tensors are never aliased)."""
    from torch.distributed.fsdp import FullyShardedDataParallel

    keyed = rename(_fqn_to_key(index))({STATE: osd[STATE], PG: osd[PG]})
    sharded = _any_sharded(keyed[STATE])
    if not sharded:
        keyed = gather_dtensors()(keyed)
    with _state_dict_type(model, full=not sharded):
        to_load = FullyShardedDataParallel.optim_state_dict_to_load(model, optim, keyed)
    to_load = {STATE: tree_map(_copy, to_load[STATE]), PG: to_load[PG]}
    type(optim).load_state_dict(optim, to_load)


def _copy(value: Any) -> Any:
    return value.clone() if isinstance(value, torch.Tensor) else value
