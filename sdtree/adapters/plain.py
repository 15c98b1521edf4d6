"""The plain :class:`~sdtree.adapters.index.StateDictIO`: reads and writes
through the modules and optimizers themselves (every model but FSDP1's).

- Read a model: off the index's paths, one pass, when no module
  customises saving; else through ``model.state_dict()`` (hooks and
  overrides honoured), re-keyed to canonical FQNs.
- Read an optimizer: its state and groups directly (new containers, shared
  leaves) when it customises nothing, else its own ``state_dict()``; with
  the initial state (:mod:`sdtree.adapters.initial_state`) when it has none.
- Write a model: module by module through each module's own
  ``_load_from_state_dict``, so the cost stays linear in the number of keys
  (or the root's own ``load_state_dict`` when it overrides it).
- Write an optimizer: state copied into its current tensors where they fit,
  else into new ones (one allocation per dtype and device), one batched copy.
"""

from __future__ import annotations

import copy
import itertools
from collections import defaultdict
from collections.abc import Iterator, Mapping
from typing import Any, Optional

import attrs
import torch
from torch import nn
from torch.nn.modules.module import _IncompatibleKeys

from sdtree.adapters.index import Entry, ModelIndex, ModelWrite, OptimWrite, ids_to_fqns
from sdtree.adapters.initial_state import needs_initial_state, shadow_initial_state
from sdtree.errors import api_name
from sdtree.transforms import rename
from sdtree.transforms.sharding import local_slice, shard_as
from sdtree.transforms.tensors import allocate, is_dtensor
from sdtree.types import PARAMS, PG, STATE

__all__ = ["PlainIO", "PLAIN", "read_off_paths"]


@attrs.frozen
class PlainIO:
    """Reads and writes through the modules and optimizers themselves."""

    @property
    def collective(self) -> bool:
        return False

    def params_of(self, module: nn.Module) -> Iterator[tuple[str, Any, Optional[Any]]]:
        params = module._parameters  # no generator: this runs once per module of every walk
        return zip(params.keys(), params.values(), itertools.repeat(None))

    def read_model(self, model: nn.Module, index: ModelIndex) -> dict[str, Any]:
        if index.plain_save:
            return read_off_paths(index)
        state_dict: dict[str, Any] = rename(dict(index.key_to_fqn))(type(model).state_dict(model))
        return state_dict

    def read_optimizer(self, model: nn.Module, optim: torch.optim.Optimizer, index: ModelIndex) -> dict[str, Any]:
        return _read_optimizer(optim, index.params.optimizer_fqns(optim))

    def plan_view(self, optim: torch.optim.Optimizer, index: ModelIndex) -> torch.optim.Optimizer:
        return optim

    def destinations(self, index: ModelIndex, sources: Mapping[str, str]) -> dict[str, torch.Tensor]:
        return _destinations(index, sources)

    def write_model(self, model: nn.Module, index: ModelIndex, write: ModelWrite) -> None:
        _write_model(model, index, write)

    def write_optimizer(self, model: nn.Module, optim: torch.optim.Optimizer, index: ModelIndex, write: OptimWrite) -> None:
        _write_optimizer(optim, write)


PLAIN = PlainIO()


def read_off_paths(index: ModelIndex) -> dict[str, Any]:
    """The state dict ``model.state_dict()`` would give, read off the index's
    paths in one pass (when no module customises saving), keyed by
    canonical FQNs; no :class:`~sdtree.adapters.index.Entry` is built."""
    return {
        fqn + name: value.detach() if kind != "extra" else module.get_extra_state()
        for module, _, _, fqn, name, kind, value in index.state()
    }


def _read_optimizer(optim: torch.optim.Optimizer, fqns: list[list[str]]) -> dict[str, Any]:
    """``optim.state_dict()`` keyed by the FQNs ``fqns`` (one list per group),
    with the state torch's ``_init_optim_state`` would create when the
    optimizer has none and no parameter has a grad.

    An optimizer that customises nothing is read directly (one pass, new
    containers, shared leaves); otherwise its own ``state_dict()`` is called
    and re-keyed.
    """
    plain = (
        type(optim).state_dict is torch.optim.Optimizer.state_dict
        and not optim._optimizer_state_dict_pre_hooks
        and not optim._optimizer_state_dict_post_hooks
    )
    if plain and optim.state:
        fqn_of = {id(p): f for group, names in zip(optim.param_groups, fqns) for p, f in zip(group[PARAMS], names)}
        return {
            STATE: {fqn_of[id(k)]: dict(v) for k, v in optim.state.items() if id(k) in fqn_of},
            PG: [
                {**{k: v for k, v in group.items() if k != PARAMS}, PARAMS: list(names)}
                for group, names in zip(optim.param_groups, fqns)
            ],
        }
    osd = type(optim).state_dict(optim)
    if needs_initial_state(optim):
        osd = {STATE: shadow_initial_state(optim), PG: osd[PG]}
    named: dict[str, Any] = ids_to_fqns(fqns)(osd)
    return named


def _destinations(index: ModelIndex, sources: Mapping[str, str]) -> dict[str, torch.Tensor]:
    """For a broadcast load: the model's own tensors that values may be
    received straight into (by state-dict key), so that the load needs no
    memory beyond its buckets. Only plain parameters and buffers with memory,
    not in inference mode, of modules that load through ``nn.Module``'s own
    ``_load_from_state_dict`` with no load pre-hooks (those must see every
    key), and each written from one key only (two keys of a tied parameter
    go through :func:`_write_model`, where the last one wins as in torch)."""
    if not index.plain_load:
        return {}
    base = nn.Module._load_from_state_dict
    targets: dict[str, torch.Tensor] = {}
    keys_of: dict[int, list[str]] = {}
    for fqn, key in sources.items():
        entry = index.entries[fqn]
        value = entry.value
        if key != fqn or entry.kind == "extra" or type(value) not in (torch.Tensor, nn.Parameter):
            continue  # a tied parameter filled from its alias lands with the alias
        if value.is_meta or value.is_inference():
            continue
        module = entry.module
        if type(module)._load_from_state_dict is base and "_load_from_state_dict" not in vars(module):
            if not module._load_state_dict_pre_hooks:
                targets[key] = value
                keys_of.setdefault(id(value), []).append(key)
    for keys in keys_of.values():
        if len(keys) > 1:
            for key in keys:
                del targets[key]
    return targets


def _write_model(model: nn.Module, index: ModelIndex, write: ModelWrite) -> None:
    """The one side effect: load ``write.values`` into the model.

    Parameters and buffers on the meta device (a model built without
    memory) are replaced by the loaded tensors (``assign``), the others are
    copied into.
    """
    entries = index.entries
    if not index.plain_load:
        raw = {entries[fqn].prefix + entries[fqn].name: value for fqn, value in write.values.items()}
        assign = any(e.kind != "extra" and e.value.is_meta for e in entries.values())
        type(model).load_state_dict(model, raw, strict=False, assign=assign)
        return
    by_module: dict[int, dict[str, Any]] = {}
    on_meta: set[int] = set()
    for fqn, value in write.values.items():
        entry: Entry = entries[fqn]
        by_module.setdefault(id(entry.module), {})[entry.prefix + entry.name] = value
        if entry.kind != "extra" and entry.value.is_meta:
            on_meta.add(id(entry.module))
    missing: list[str] = []
    unexpected: list[str] = []
    errors: list[str] = []
    with torch.no_grad():
        for attr, _, module in index.modules:
            local = by_module.get(id(module), {})
            own = {k: v for k, v in local.items() if k.startswith(attr) and "." not in k[len(attr):]}
            metadata: dict[str, Any] = {"version": getattr(module, "_version", None)}
            if id(module) in on_meta:
                metadata["assign_to_params_buffers"] = True
            module._load_from_state_dict(own, attr, metadata, False, missing, unexpected, errors)
    if errors:
        raise RuntimeError(f"{api_name()}: error(s) while loading: {'; '.join(errors)}")
    incompatible = _IncompatibleKeys(list(write.missing), list(write.unexpected))
    for _, _, module in reversed(index.modules):
        for hook in module._load_state_dict_post_hooks.values():
            hook(module, incompatible)


def _write_optimizer(optim: torch.optim.Optimizer, write: OptimWrite) -> None:
    """The one side effect: load ``write`` into ``optim``.

    State tensors are copied, never aliased: into the optimizer's current
    state tensor where it fits, else into new tensors (one allocation per
    dtype and device), with one batched copy.
    """
    fast = (
        type(optim).load_state_dict is torch.optim.Optimizer.load_state_dict
        and not optim._optimizer_load_state_dict_pre_hooks
    )
    if not fast:
        type(optim).load_state_dict(optim, copy.deepcopy(write.fqn_osd))
        return
    groups = [{**copy.deepcopy(hypers), PARAMS: group[PARAMS]} for group, hypers in zip(optim.param_groups, write.groups)]
    state: defaultdict[torch.Tensor, Any] = defaultdict(dict)
    dsts: list[Any] = []
    srcs: list[torch.Tensor] = []
    fresh: dict[torch.device, list[tuple[dict[str, Any], str, int]]] = {}
    fresh_specs: dict[torch.device, list[tuple[torch.Size, torch.dtype]]] = {}
    currents = {id(param): entry for param, entry in optim.state.items()}  # no Python-level tensor hashing
    for param, j, entry in write.state.values():
        group = groups[j]
        current = currents.get(id(param)) or {}
        new: dict[str, Any] = {}
        for key, value in entry.items():
            if not isinstance(value, torch.Tensor):
                new[key] = _cast(param, value, key, group)
                continue
            cur = current.get(key)
            if cur is value:  # already the optimizer's own tensor: nothing to copy
                new[key] = cur
                continue
            if is_dtensor(param) or is_dtensor(value):
                local = _into_shard(cur, value, key, group, param)
                if local is None:
                    new[key] = _cast_sharded(param, value, key, group)
                    continue
                state_dtensor: Any = cur  # a full tensor into the current DTensor state: copy this rank's slice
                new[key] = state_dtensor
                dsts.append(state_dtensor._local_tensor)
                srcs.append(local)
                continue
            dtype, device = _target(param, value, key, group)
            if isinstance(cur, torch.Tensor) and cur.shape == value.shape and cur.dtype == dtype and cur.device == device:
                new[key] = cur
                dsts.append(cur)
            else:
                fresh.setdefault(device, []).append((new, key, len(dsts)))
                fresh_specs.setdefault(device, []).append((value.shape, dtype))
                dsts.append(None)
            srcs.append(value)
        state[param] = new
    for device, slots in fresh.items():
        for (new, key, i), tensor in zip(slots, allocate(fresh_specs[device], device=device)):
            new[key] = dsts[i] = tensor
    with torch.no_grad():
        if dsts:
            torch._foreach_copy_(dsts, srcs)
    optim.__setstate__({"state": state, "param_groups": groups})
    for hook in optim._optimizer_load_state_dict_post_hooks.values():
        hook(optim)


def _cast(param: torch.Tensor, value: Any, key: Any, group: Mapping[str, Any]) -> Any:
    """torch's load-time policy for a nested state value, as a copy."""
    if isinstance(value, torch.Tensor):
        dtype, device = _target(param, value, key, group)
        return value.to(dtype=dtype, device=device, copy=True)
    if isinstance(value, Mapping):
        return {k: _cast(param, v, k, group) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_cast(param, v, None, group) for v in value)
    return value


def _cast_sharded(param: torch.Tensor, value: torch.Tensor, key: Any, group: Mapping[str, Any]) -> Any:
    """A state tensor of a sharded parameter: a full tensor of the parameter's
    shape becomes this rank's shard (laid out as the parameter); the rest is
    copied by torch's policy."""
    dtype, device = _target(param, value, key, group)
    if is_dtensor(param) and not is_dtensor(value) and value.dim() > 0 and value.shape == param.shape:
        return shard_as(value.to(dtype=dtype), param)
    return value.to(dtype=dtype, device=device, copy=True)


def _into_shard(cur: Any, value: torch.Tensor, key: Any, group: Mapping[str, Any], param: torch.Tensor) -> Any:
    """This rank's slice of the full tensor ``value`` when it can be copied
    into the current DTensor state ``cur`` in place (same shape and target
    dtype, FSDP2's layout); else None."""
    if not is_dtensor(cur) or is_dtensor(value) or cur.shape != value.shape:
        return None
    if cur.dtype != _target(param, value, key, group)[0]:
        return None
    local = local_slice(value.to(cur.dtype), cur)
    return local if local is not None and local.shape == cur._local_tensor.shape else None


def _target(param: torch.Tensor, value: torch.Tensor, key: Any, group: Mapping[str, Any]) -> tuple[torch.dtype, torch.device]:
    """Where torch's ``Optimizer.load_state_dict`` puts a state tensor: floating
    state follows the parameter's dtype, everything its device, and ``step``
    stays as it is unless the group is fused or capturable."""
    if key == "step":
        if group.get("fused") or group.get("capturable"):
            return torch.float32, param.device
        return value.dtype, value.device
    return (param.dtype if param.is_floating_point() else value.dtype), param.device
