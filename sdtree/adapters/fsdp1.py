"""FSDP1 (``FullyShardedDataParallel``): its part of the walk, and the
:class:`~sdtree.adapters.index.StateDictIO` that reads and writes through
FSDP's own state-dict hooks.

FSDP1 keeps the parameters of each wrapped module in one flat parameter
(sharded across ranks), so only FSDP can expand it to the original FQNs.
The walk (:class:`FlatParameters`) records a meta stand-in of the full
shape for every parameter a flat parameter holds, so that loads are
validated by the same plans as every other model. :class:`FSDP1IO` asks
FSDP for the *sharded* state dict (``ShardedTensor`` values, as torch's
``get_state_dict`` returns by default) and, for a full state dict, gathers
it itself (:func:`~sdtree.transforms.gather.gather_dtensors`): torch's own
full-state-dict path with ``offload_to_cpu`` crashes on CPU. Validated loads
are handed to FSDP.

Collective: every read and write here runs FSDP collectives; call on every rank.
"""

from __future__ import annotations

import contextlib
import copy
import sys
import warnings
from collections import defaultdict
from collections.abc import Iterator, Mapping
from typing import Any, Optional

import attrs
import torch
from torch import nn

from sdtree._tree import tree_flatten, tree_map
from sdtree.adapters.index import ModelIndex, ModelWrite, OptimWrite
from sdtree.adapters.initial_state import needs_initial_state, with_initial_state
from sdtree.transforms import rename
from sdtree.transforms.gather import gather_dtensors
from sdtree.transforms.tensors import is_sharded_tensor
from sdtree.types import PARAMS, PG, STATE

__all__ = ["WRAPPED_CHILD", "is_fsdp1", "FlatParameters", "FSDP1IO"]

WRAPPED_CHILD = "_fsdp_wrapped_module"


def is_fsdp1(module: nn.Module) -> bool:
    """Whether ``module`` is a ``FullyShardedDataParallel`` instance."""
    fsdp = sys.modules.get("torch.distributed.fsdp.fully_sharded_data_parallel")
    return fsdp is not None and isinstance(module, fsdp.FullyShardedDataParallel)


class FlatParameters:
    """FSDP1's part of the walk: the flat parameters met, and a meta stand-in
    of the full shape for every parameter they hold.

    The walk calls :meth:`visit` on every module, in ``state_dict()`` order;
    afterwards (the record is not changed again) :meth:`params_of` lists a
    module's parameters as ``model.state_dict()`` does.
    """

    def __init__(self) -> None:
        self._held: dict[int, dict[str, Any]] = {}  # id(module) -> {name: full-shape stand-in}
        self.members: dict[int, list[tuple[int, str]]] = {}  # id(FlatParameter) -> its (id(module), name)s

    def __bool__(self) -> bool:
        """Whether the walk met any flat parameter (the model is FSDP1's)."""
        return bool(self.members)

    def visit(self, module: nn.Module) -> None:
        """Record ``module``'s flat parameter, when it is an FSDP1 instance."""
        if is_fsdp1(module):
            handle = getattr(module, "_handle", None)
            flat_param = None if handle is None else handle.flat_param
            if flat_param is not None and id(flat_param) not in self.members:
                self.members[id(flat_param)] = self._register(flat_param)

    def _register(self, flat_param: Any) -> list[tuple[int, str]]:
        """Record a meta stand-in of the full shape for every parameter that
        ``flat_param`` holds (shared ones get their primary's); return the
        ``(id(module), name)`` of its own parameters, in its order."""
        params = flat_param._params  # the original parameters, with use_orig_params=True
        members = []
        for i, (info, shape) in enumerate(zip(flat_param._param_infos, flat_param._shapes)):
            requires_grad = params[i].requires_grad if params is not None else flat_param.requires_grad
            stand_in = torch.empty(shape, dtype=flat_param.dtype, device="meta").requires_grad_(requires_grad)
            self._held.setdefault(id(info.module), {})[info.param_name] = stand_in
            members.append((id(info.module), info.param_name))
        for shared in flat_param._shared_param_infos:
            primary = self._held[id(shared.prim_module)][shared.prim_param_name]
            self._held.setdefault(id(shared.module), {})[shared.param_name] = primary
        return members

    def params_of(self, module: nn.Module) -> Iterator[tuple[str, Any, Optional[Any]]]:
        """``(name, parameter, full-shape stand-in or None)`` for a module's
        parameters as ``model.state_dict()`` lists them: the parameters a
        flat parameter holds (present, or only a stand-in), never the flat
        parameters themselves."""
        held = self._held.get(id(module))
        flat_params = self.members
        for name, param in module._parameters.items():
            if param is not None and not (held and name in held) and id(param) not in flat_params:
                yield name, param, None
        if held:
            for name, stand_in in held.items():
                param = module._parameters.get(name)
                yield name, stand_in if param is None else param, stand_in


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


def _any_sharded(tree: Any) -> bool:
    leaves, _ = tree_flatten(tree)
    return any(is_sharded_tensor(leaf) for leaf in leaves)


def _copy(value: Any) -> Any:
    return value.clone() if isinstance(value, torch.Tensor) else value


@attrs.frozen(eq=False)
class FSDP1IO:
    """Reads and writes through FSDP1's state-dict hooks.

    Attributes:
        flat: what the walk recorded of the flat parameters.
    """

    flat: FlatParameters

    @property
    def collective(self) -> bool:
        return True

    def params_of(self, module: nn.Module) -> Iterator[tuple[str, Any, Optional[Any]]]:
        return self.flat.params_of(module)

    def read_model(self, model: nn.Module, index: ModelIndex) -> dict[str, Any]:
        """The model's sharded state dict (``ShardedTensor`` parameters), keyed by canonical FQNs."""
        with _state_dict_type(model, full=False):
            raw = type(model).state_dict(model)
        state_dict: dict[str, Any] = rename(dict(index.key_to_fqn))(raw)
        return state_dict

    def read_optimizer(self, model: nn.Module, optim: torch.optim.Optimizer, index: ModelIndex) -> dict[str, Any]:
        """``optim``'s sharded state dict, expanded by FSDP to the original
        parameters and keyed by canonical FQNs. An optimizer with no state yet
        reports its initial state, computed on a shadow copy (no step)."""
        from torch.distributed.fsdp import FullyShardedDataParallel

        source = with_initial_state(optim) if needs_initial_state(optim) else optim
        # the class's state_dict, not the instance's: patch_optimizer_state_dict
        # makes that one call back here
        raw = type(source).state_dict(source)
        with _state_dict_type(model, full=False):
            osd = FullyShardedDataParallel.optim_state_dict(model, source, optim_state_dict=raw)
        named: dict[str, Any] = rename(dict(index.key_to_fqn))(osd)
        return named

    def plan_view(self, optim: torch.optim.Optimizer, index: ModelIndex) -> torch.optim.Optimizer:
        """A view of ``optim`` as the plans see other optimizers: each flat
        parameter replaced by the full-shape stand-ins of the parameters it
        holds (each parameter shard likewise), in FSDP's order, and no state.

        Only read by the load plans; never stepped or written.
        """
        owner: dict[tuple[int, str], str] = {}  # (id(module), name) -> the FQN of its first path
        for fqn, entry in index.entries.items():
            if entry.kind == "param":
                owner.setdefault((id(entry.module), entry.name), fqn)
        groups = []
        for group in optim.param_groups:
            params: list[torch.Tensor] = []
            for param in group[PARAMS]:
                members = self.flat.members.get(id(param))
                if members is not None:  # a flat parameter: the stand-ins of the parameters it holds
                    fqns: tuple[str, ...] = tuple(owner[m] for m in members if m in owner)
                else:  # use_orig_params=True: the original parameter
                    orig = index.params.fqn_of_param(param)
                    fqns = (orig,) if orig is not None else ()
                params.extend(index.entries[fqn].value for fqn in fqns)
            groups.append({**group, PARAMS: params})
        view = copy.copy(optim)
        view.param_groups = groups
        view.state = defaultdict(dict)
        return view

    def destinations(self, index: ModelIndex, sources: Mapping[str, str]) -> dict[str, torch.Tensor]:
        return {}  # FSDP takes the values whole and shards them itself

    def write_model(self, model: nn.Module, index: ModelIndex, write: ModelWrite) -> None:
        """Load validated values through FSDP: a sharded state dict
        (``ShardedTensor`` parameters) as such, anything else as a full one
        (DTensors gathered first)."""
        raw = rename(_fqn_to_key(index))(dict(write.values))
        sharded = _any_sharded(raw)
        if not sharded:
            raw = gather_dtensors()(raw)
        with _state_dict_type(model, full=not sharded):
            type(model).load_state_dict(model, raw, strict=False)

    def write_optimizer(self, model: nn.Module, optim: torch.optim.Optimizer, index: ModelIndex, write: OptimWrite) -> None:
        """Load a validated FQN-keyed optimizer state dict through FSDP, which
        flattens and shards it into ``optim``'s parameters; the values ``optim``
        keeps are copies (the caller's tensors are never aliased)."""
        from torch.distributed.fsdp import FullyShardedDataParallel

        osd = write.fqn_osd
        keyed = rename(_fqn_to_key(index))({STATE: osd[STATE], PG: osd[PG]})
        sharded = _any_sharded(keyed[STATE])
        if not sharded:
            keyed = gather_dtensors()(keyed)
        with _state_dict_type(model, full=not sharded):
            to_load = FullyShardedDataParallel.optim_state_dict_to_load(model, optim, keyed)
        to_load = {STATE: tree_map(_copy, to_load[STATE]), PG: to_load[PG]}
        type(optim).load_state_dict(optim, to_load)
