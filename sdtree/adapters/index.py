"""The one walk over a model: an immutable index of its state-dict entries.

For every entry ``model.state_dict()`` yields (parameters, persistent
buffers, ``_extra_state``) the index records its canonical FQN, the module
that owns it and the path through which that module's own
``_load_from_state_dict`` expects it. Wrapper segments are removed at any
depth and in any nesting order: DDP's ``module.``, ``torch.compile``'s
``_orig_mod.``, activation checkpointing's ``_checkpoint_wrapped_module.``,
FSDP's ``_fsdp_wrapped_module.``, and the hidden children a module names in
its ``_fqn_modifiers()`` (the ``dsd_fqn_modifiers`` option).

The walk is linear in the number of modules, parameters and buffers, reads
the model without changing it, and is built per call: nothing caches a model.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator, Mapping
from typing import Any, Literal, NamedTuple

import attrs
import torch
from torch import nn

from sdtree.transforms.distributed import is_dtensor

__all__ = ["Entry", "ModelIndex", "ParamIndex", "index_model", "index_params", "iter_modules"]

_EXTRA_STATE = "_extra_state"
_AC_CHILD = "_checkpoint_wrapped_module"
_FSDP1_CHILD = "_fsdp_wrapped_module"


class Entry(NamedTuple):
    """One state-dict entry of a model."""

    fqn: str  # canonical
    module: nn.Module  # owner
    name: str  # the owner's local name ("weight", "_extra_state")
    prefix: str  # the owner's prefix for _load_from_state_dict (attribute path)
    kind: Literal["param", "buffer", "extra"]
    value: Any  # the parameter or buffer (None for extra state)


@attrs.frozen(eq=False)
class ParamIndex:
    """The light view of a model that optimizers need: parameter names only.

    Parameters are keyed by ``id``: a tensor's own hash is a Python call.

    Attributes:
        first_fqn: ``id(parameter)`` -> its first canonical FQN (the one
            ``named_parameters()`` reaches first).
        attr_to_fqn: name as ``model.named_parameters()`` spells it -> FQN.
        tied: FQN -> every FQN of its parameter, for tied parameters only.
        fsdp1: the model is sharded by FSDP1; its optimizers hold flat
            parameters or shards, named through :attr:`ModelIndex.flat`.
    """

    first_fqn: Mapping[int, str]
    attr_to_fqn: Mapping[str, str]
    tied: Mapping[str, tuple[str, ...]]
    fsdp1: bool = False  # the model holds FSDP1 flat parameters: see ModelIndex.flat

    def fqn_of_param(self, param: torch.Tensor) -> str | None:
        return self.first_fqn.get(id(param))

    def aliases(self, fqn: str) -> tuple[str, ...]:
        """Every FQN of the parameter named ``fqn`` (one, unless tied)."""
        return self.tied.get(fqn, (fqn,))


@attrs.frozen(eq=False)
class ModelIndex:
    """Immutable facts about a model's state-dict entries.

    Attributes:
        entries: canonical FQN -> :class:`Entry`, in ``model.state_dict()`` order
            (the first path of a shared parameter or module owns the entry only
            once per path; each path is its own FQN).
        key_to_fqn: key as ``model.state_dict()`` spells it -> canonical FQN.
        params: the parameters' names (:class:`ParamIndex`).
        frozen: FQNs of parameters with ``requires_grad=False``.
        modules: ``(attribute prefix, FQN prefix, module)`` for every module path, in
            load order (a shared module appears once per path).
        plain_save: no module customises saving (hooks or overrides), so the
            state dict can be read off the entries without ``state_dict()``.
        sharded: FQN -> DTensor, for every parameter and buffer that is one
            (every rank must take part in a load of such a model).
        flat: for FSDP1 (``FullyShardedDataParallel``): ``id(FlatParameter)`` ->
            the FQNs of the parameters it holds, in its order; their entries'
            values are meta tensors of the full shapes. Empty otherwise.
        plain_load: the root does not override ``load_state_dict``, so each
            module's ``_load_from_state_dict`` can be called with its own keys.
    """

    entries: Mapping[str, Entry]
    key_to_fqn: Mapping[str, str]
    params: ParamIndex
    frozen: frozenset[str]
    modules: tuple[tuple[str, str, nn.Module], ...]
    plain_save: bool
    plain_load: bool
    sharded: Mapping[str, Any]
    flat: Mapping[int, tuple[str, ...]] = attrs.field(factory=dict)

    @property
    def fsdp1(self) -> bool:
        """Whether the model is sharded by FSDP1 (its flat parameters are read
        and written through FSDP's own state-dict hooks)."""
        return bool(self.flat)

    @property
    def distributed(self) -> bool:
        """Whether every rank must take part in a load of this model."""
        return bool(self.sharded) or self.fsdp1


def _hidden_children(module: nn.Module, modifiers: str) -> tuple[set[str], set[str]]:
    """Return (children dropped from FQNs, children dropped from state-dict keys)."""
    hidden: set[str] = set()
    unkeyed: set[str] = set()
    ddp = sys.modules.get("torch.nn.parallel.distributed")
    if ddp is not None and isinstance(module, ddp.DistributedDataParallel):
        hidden.add("module")
    dynamo = sys.modules.get("torch._dynamo.eval_frame")
    if dynamo is not None and isinstance(module, dynamo.OptimizedModule):
        hidden.add("_orig_mod")
    ac = sys.modules.get("torch.distributed.algorithms._checkpoint.checkpoint_wrapper")
    if ac is not None and isinstance(module, ac.ActivationWrapper):
        hidden.add(_AC_CHILD)
        unkeyed.add(_AC_CHILD)
    if _is_fsdp1(module):
        hidden.add(_FSDP1_CHILD)  # FSDP1's own state-dict hooks drop it from keys too
        unkeyed.add(_FSDP1_CHILD)
    modifier = getattr(module, modifiers, None)
    if modifier is not None and callable(modifier):
        hidden.update(modifier().values())
    return hidden, unkeyed


def type_traits(cls: type) -> tuple[bool, bool, bool]:
    """(saves as nn.Module does, loads as nn.Module does, has extra state) for ``cls``.

    Looked up on every call, as ``nn.Module.state_dict`` does: a class may be
    given ``get_extra_state`` (or a ``state_dict``) after its first use, and a
    cache per class would then miss it.
    """
    module: Any = cls
    save = module.state_dict is nn.Module.state_dict and module._save_to_state_dict is nn.Module._save_to_state_dict
    load = module.load_state_dict is nn.Module.load_state_dict
    extra = getattr(module, "get_extra_state", nn.Module.get_extra_state) is not nn.Module.get_extra_state
    return save, load, extra


def iter_modules(model: nn.Module, dsd_fqn_modifiers: str) -> Iterator[tuple[nn.Module, str, str, str]]:
    """Yield ``(module, attribute prefix, state-dict key prefix, FQN prefix)`` for
    every module path, in ``state_dict()`` order (preorder, registration order)."""
    stack: list[tuple[nn.Module, str, str, str]] = [(model, "", "", "")]
    while stack:
        item = stack.pop()
        yield item
        module, attr, key, fqn = item
        if not module._modules:
            continue
        hidden, unkeyed = _hidden_children(module, dsd_fqn_modifiers)
        for name, child in reversed(module._modules.items()):
            if child is None:
                continue
            stack.append(
                (
                    child,
                    f"{attr}{name}.",
                    key if name in unkeyed else f"{key}{name}.",
                    fqn if name in hidden else f"{fqn}{name}.",
                )
            )


def index_model(model: nn.Module, dsd_fqn_modifiers: str = "_fqn_modifiers") -> ModelIndex:
    """Walk ``model`` once and return its :class:`ModelIndex`."""
    entries: dict[str, Entry] = {}
    key_to_fqn: dict[str, str] = {}
    attr_to_fqn: dict[str, str] = {}
    first_fqn: dict[int, str] = {}
    tied: dict[int, list[str]] = {}
    frozen: set[str] = set()
    modules: list[tuple[str, str, nn.Module]] = []
    owner: dict[tuple[int, str], str] = {}
    plain_save = True
    held: dict[int, dict[str, Any]] = {}  # id(module) -> {name: full-shape stand-in}, under FSDP1
    flat_members: dict[int, list[tuple[int, str]]] = {}
    for module, attr, key, fqn in iter_modules(model, dsd_fqn_modifiers):
        modules.append((attr, fqn, module))
        _, _, extra = type_traits(type(module))
        if customises_save(module):
            plain_save = False
        flat_param = _flat_param_of(module)
        if flat_param is not None and id(flat_param) not in flat_members:
            flat_members[id(flat_param)] = _register_flat(flat_param, held)
        for name, param, stand_in in _params_of(module, held.get(id(module)), flat_members):
            canonical = fqn + name
            entries[canonical] = Entry(canonical, module, name, attr, "param", stand_in if stand_in is not None else param)
            key_to_fqn[key + name] = canonical
            attr_to_fqn.setdefault(attr + name, canonical)
            _add_param(first_fqn, tied, id(param), canonical)
            if not param.requires_grad:
                frozen.add(canonical)
            if stand_in is not None:  # FSDP1: the entry reports the full shape
                if stand_in is not param:
                    _add_param(first_fqn, tied, id(stand_in), canonical)
                owner.setdefault((id(module), name), canonical)
        non_persistent = module._non_persistent_buffers_set
        for name, buffer in module._buffers.items():
            if buffer is None or name in non_persistent:
                continue
            canonical = fqn + name
            entries[canonical] = Entry(canonical, module, name, attr, "buffer", buffer)
            key_to_fqn[key + name] = canonical
        if extra:
            canonical = fqn + _EXTRA_STATE
            entries[canonical] = Entry(canonical, module, _EXTRA_STATE, attr, "extra", None)
            key_to_fqn[key + _EXTRA_STATE] = canonical
    return ModelIndex(
        entries=entries,
        key_to_fqn=key_to_fqn,
        params=_param_index(first_fqn, tied, attr_to_fqn, fsdp1=bool(flat_members)),
        frozen=frozenset(frozen),
        modules=tuple(modules),
        plain_save=plain_save,
        plain_load=type_traits(type(model))[1],
        sharded={fqn: e.value for fqn, e in entries.items() if e.kind != "extra" and is_dtensor(e.value)},
        flat={k: tuple(owner[m] for m in members if m in owner) for k, members in flat_members.items()},
    )


def customises_save(module: nn.Module) -> bool:
    """Whether ``module``'s state dict must come from its own ``state_dict()``:
    its class customises saving, or it has state-dict hooks."""
    return not type_traits(type(module))[0] or bool(module._state_dict_hooks or module._state_dict_pre_hooks)


def _is_fsdp1(module: nn.Module) -> bool:
    fsdp = sys.modules.get("torch.distributed.fsdp.fully_sharded_data_parallel")
    return fsdp is not None and isinstance(module, fsdp.FullyShardedDataParallel)


def _flat_param_of(module: nn.Module) -> Any:
    """The FlatParameter an FSDP1 instance manages (None for other modules)."""
    if not _is_fsdp1(module):
        return None
    handle = getattr(module, "_handle", None)
    return None if handle is None else handle.flat_param


def _register_flat(flat_param: Any, held: dict[int, dict[str, Any]]) -> list[tuple[int, str]]:
    """Record a meta stand-in of the full shape for every parameter that
    ``flat_param`` holds (shared ones get their primary's); return the
    ``(id(module), name)`` of its own parameters, in its order."""
    params = flat_param._params  # the original parameters, with use_orig_params=True
    members = []
    for i, (info, shape) in enumerate(zip(flat_param._param_infos, flat_param._shapes)):
        requires_grad = params[i].requires_grad if params is not None else flat_param.requires_grad
        stand_in = torch.empty(shape, dtype=flat_param.dtype, device="meta").requires_grad_(requires_grad)
        held.setdefault(id(info.module), {})[info.param_name] = stand_in
        members.append((id(info.module), info.param_name))
    for shared in flat_param._shared_param_infos:
        primary = held[id(shared.prim_module)][shared.prim_param_name]
        held.setdefault(id(shared.module), {})[shared.param_name] = primary
    return members


def _params_of(
    module: nn.Module, held: Mapping[str, Any] | None, flat_params: Mapping[int, Any]
) -> Iterator[tuple[str, Any, Any]]:
    """``(name, parameter, full-shape stand-in or None)`` for a module's
    parameters as ``model.state_dict()`` lists them: under FSDP1 the
    parameters a flat parameter holds (present, or only a stand-in), never
    the flat parameters themselves (``flat_params``, by id: their FSDP module
    is walked before the module holding them)."""
    for name, param in module._parameters.items():
        if param is not None and not (held and name in held) and id(param) not in flat_params:
            yield name, param, None
    if held:
        for name, stand_in in held.items():
            param = module._parameters.get(name)
            yield name, stand_in if param is None else param, stand_in


def index_params(
    model: nn.Module, dsd_fqn_modifiers: str = "_fqn_modifiers", *, attr_names: bool = True
) -> ParamIndex:
    """Walk ``model`` once for its parameters' canonical FQNs only (and, with
    ``attr_names``, the ``named_parameters()`` spelling of each)."""
    first_fqn: dict[int, str] = {}
    tied: dict[int, list[str]] = {}
    attr_to_fqn: dict[str, str] = {}
    fsdp1 = False
    for module, attr, _, fqn in iter_modules(model, dsd_fqn_modifiers):
        fsdp1 = fsdp1 or _is_fsdp1(module)
        for name, param in module._parameters.items():
            if param is not None:
                canonical = fqn + name
                _add_param(first_fqn, tied, id(param), canonical)
                if attr_names:
                    attr_to_fqn.setdefault(attr + name, canonical)
    return _param_index(first_fqn, tied, attr_to_fqn, fsdp1=fsdp1)


def _add_param(first_fqn: dict[int, str], tied: dict[int, list[str]], key: int, fqn: str) -> None:
    first = first_fqn.setdefault(key, fqn)
    if first is not fqn:
        tied.setdefault(key, [first]).append(fqn)


def _param_index(
    first_fqn: dict[int, str], tied: dict[int, list[str]], attr_to_fqn: dict[str, str], *, fsdp1: bool
) -> ParamIndex:
    aliases = {f: tuple(fqns) for fqns in tied.values() for f in fqns}
    return ParamIndex(first_fqn, attr_to_fqn, aliases, fsdp1)
