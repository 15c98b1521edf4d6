"""Read and write optimizers' state dicts: ``get_optimizer_state_dict`` and
``set_optimizer_state_dict`` (torch's signatures and results).

``get``: read each optimizer (its own ``state_dict()``; for an optimizer with
no state yet, the state one zero-lr step on zero grads would create, computed
on a shadow copy so the optimizer, its parameters and their grads stay
untouched) -> pipeline (parameter ids to canonical FQNs, merge, flatten,
gather/offload). ``set``: unflatten and split per optimizer -> plan (group
layout, keys, shapes and leaf types, for every optimizer, no write) -> one
write per optimizer.
"""

from __future__ import annotations

import copy
from collections import OrderedDict, defaultdict
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple, Optional, Union

import torch
from torch import nn

from sdtree.adapters._common import agree, announce_load, as_optimizers, check_optim_not_empty, finish, warn_submodules, without_gc
from sdtree.adapters import fsdp1
from sdtree.adapters.index import ModelIndex, ParamIndex, index_model, index_params
from sdtree.errors import IncompatibleStateDictError, LayoutMismatchError, MissingParamIdError, _preview
from sdtree.options import StateDictOptions, as_options
from sdtree.transforms import (
    OptimizerLayout,
    Transform,
    flatten_optimizer,
    merge_optimizers,
    param_ids_to_fqns,
    select_keys,
    unflatten_optimizer,
)
from sdtree.transforms._forms import PARAMS, PG, STATE, is_optim_state_dict
from sdtree.transforms.distributed import Announcement, is_dtensor, local_slice, shard_as
from sdtree.transforms.tensors import allocate

__all__ = [
    "get_optimizer_state_dict",
    "set_optimizer_state_dict",
    "patch_optimizer_state_dict",
    "optimizer_fqns",
]

Index = Union[ParamIndex, ModelIndex]
Optimizers = Union[torch.optim.Optimizer, "list[torch.optim.Optimizer]", "tuple[torch.optim.Optimizer, ...]"]


def optimizer_fqns(index: ParamIndex, optim: torch.optim.Optimizer) -> list[list[str]]:
    """The canonical FQN of every parameter of each of ``optim``'s groups.

    Groups that carry ``param_names`` (optimizers built from
    ``named_parameters()``) are named by them; otherwise by the model.
    """
    groups: list[list[str]] = []
    unknown = []
    for g, group in enumerate(optim.param_groups):
        names = group.get("param_names")
        fqns: list[str] = []
        for i, param in enumerate(group[PARAMS]):
            fqn = index.attr_to_fqn.get(names[i]) if names else None
            fqn = fqn or index.fqn_of_param(param) or (names[i] if names else None)
            if fqn is None:
                unknown.append(f"param_groups[{g}]['params'][{i}] (shape {tuple(param.shape)})")
            fqns.append(fqn or "")
        groups.append(fqns)
    if unknown:
        raise MissingParamIdError(
            f"{type(optim).__name__}: {len(unknown)} parameter(s) of the optimizer are not "
            f"parameters of the model: {_preview(unknown, quote=False)}. Pass the model the "
            "optimizer was built for, or build the optimizer from model.named_parameters()."
        )
    return groups


def _ids_to_fqns(fqns: list[list[str]]) -> Transform:
    """Re-key by position: ``Optimizer.state_dict()`` numbers parameters in group order."""
    return param_ids_to_fqns(dict(enumerate(f for group in fqns for f in group)))


def _has_param_names(optims: tuple[torch.optim.Optimizer, ...]) -> bool:
    return any("param_names" in group for optim in optims for group in optim.param_groups)


# -- reading ------------------------------------------------------------------


def _shadow_initial_state(optim: torch.optim.Optimizer) -> dict[int, Any]:
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


def needs_initial_state(optim: torch.optim.Optimizer) -> bool:
    """Whether ``optim`` has no state yet and no gradient to make one: torch
    then reports the state one step would create (see ``_shadow_initial_state``)."""
    return not optim.state and not any(p.grad is not None for g in optim.param_groups for p in g[PARAMS])


def read_optimizer(optim: torch.optim.Optimizer, fqns: list[list[str]]) -> dict[str, Any]:
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
        osd = {STATE: _shadow_initial_state(optim), PG: osd[PG]}
    named: dict[str, Any] = _ids_to_fqns(fqns)(osd)
    return named


@without_gc
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
    optims = as_optimizers(optimizers)
    index = index_params(model, opts.dsd_fqn_modifiers, attr_names=_has_param_names(optims))
    if index.fsdp1:
        model_index = index_model(model, opts.dsd_fqn_modifiers)
        parts = [fsdp1.read_optimizer(model, optim, model_index) for optim in optims]
    else:
        parts = [read_optimizer(optim, optimizer_fqns(index, optim)) for optim in optims]
    osd: dict[str, Any] = parts[0] if len(parts) == 1 else merge_optimizers()(parts)
    if opts.flatten_optimizer_state_dict:
        osd = flatten_optimizer()(osd)
    osd = finish(opts)(osd)
    check_optim_not_empty(osd, opts)
    return osd


# -- loading ------------------------------------------------------------------

# Built-in optimizers whose every non-scalar state tensor has its parameter's shape.
_PARAM_SHAPED_STATE = tuple(
    getattr(torch.optim, name)
    for name in ("Adam", "AdamW", "SGD", "Adagrad", "RMSprop", "Adadelta", "Adamax", "NAdam", "RAdam", "ASGD", "Rprop")
    if hasattr(torch.optim, name)
)


class OptimPlan(NamedTuple):
    """What a validated optimizer load will write."""

    groups: list[dict[str, Any]]  # hyper-parameters for each group (no "params")
    state: dict[int, tuple[torch.Tensor, int, Mapping[str, Any]]]  # id(param) -> (param, group, entry)
    fqn_osd: dict[str, Any]  # the same, as an FQN-keyed state dict for Optimizer.load_state_dict
    fqns: list[list[str]]  # the optimizer's parameters' FQNs, by group


def _keyed_by_ids(osd: Mapping[str, Any]) -> bool:
    """Whether the nested optimizer state dict ``osd`` names parameters by
    ids (as ``optim.state_dict()`` does), not by FQNs."""
    keys = list(osd[STATE]) + [k for g in osd[PG] for k in g[PARAMS]]
    return bool(keys) and all(isinstance(k, int) for k in keys)


def _split_for(
    index: ParamIndex, optim: torch.optim.Optimizer, fqns: list[list[str]], osd: Mapping[str, Any]
) -> Mapping[str, Any]:
    """Bring ``osd`` to the unflattened FQN-keyed form for ``optim``."""
    if is_optim_state_dict(osd):
        if _keyed_by_ids(osd):
            # Parameter ids, as from optim.state_dict(): positional, as torch loads them.
            named: Mapping[str, Any] = _ids_to_fqns(fqns)(osd)
            return named
        return osd
    mine = {f for group in fqns for f in group}
    aliases = {a for f in mine for a in index.aliases(f)}
    flat_mine = select_keys(where=aliases.__contains__)(osd)
    present = set(_flat_fqns(flat_mine))
    groups = [[_pick(index, f, present) for f in group] for group in fqns]
    layout = OptimizerLayout(
        groups,
        empty_group_hyperparams={
            i: {k: v for k, v in g.items() if k != PARAMS} for i, g in enumerate(optim.param_groups) if not g[PARAMS]
        },
    )
    unflat: Mapping[str, Any] = unflatten_optimizer(layout)(flat_mine)
    return unflat


def _flat_fqns(flat: Mapping[str, Any]) -> list[str]:
    from sdtree.transforms.keys import split_flat_keys

    return [fqn for _, fqn, _ in split_flat_keys(flat, "set_optimizer_state_dict")] if flat else []


def _pick(index: ParamIndex, fqn: str, present: Any) -> str:
    """The FQN under which a (possibly tied) parameter appears in the loaded state dict."""
    for alias in index.aliases(fqn):
        if alias in present:
            return alias
    return fqn


def _leaf_problem(value: Any) -> Optional[str]:
    if isinstance(value, (torch.Tensor, int, float, type(None))):
        return None
    if isinstance(value, (Mapping, list, tuple)):
        for v in value.values() if isinstance(value, Mapping) else value:
            problem = _leaf_problem(v)
            if problem:
                return problem
        return None
    return f"unsupported value of type {type(value).__name__}"


def _state_by_id(optim: torch.optim.Optimizer) -> dict[int, Any]:
    """The optimizer's state keyed by ``id(param)`` (no Python-level tensor hashing)."""
    return {id(param): entry for param, entry in optim.state.items()}


def _state_problem(param: torch.Tensor, entry: Any, reference: Any, param_shaped: bool) -> Optional[str]:
    """Why ``entry`` cannot be ``param``'s state (None when it can).

    Shapes are checked against the optimizer's current state when it has
    some, else for torch's optimizers whose state tensors are parameter-shaped.
    """
    if not isinstance(entry, Mapping):
        return f"expected a dict of state values, found {type(entry).__name__}"
    for name, value in entry.items():
        if not isinstance(value, torch.Tensor):
            problem = _leaf_problem(value)
            if problem:
                return f"{name!r}: {problem}"
            continue
        if name == "step":
            continue
        expected = reference.get(name) if reference else None
        if expected is value:
            continue  # the optimizer's own state tensor
        if isinstance(expected, torch.Tensor):
            shape = expected.shape
        elif param_shaped and value.dim() > 0:
            shape = param.shape
        else:
            continue
        if value.shape != shape:
            return f"{name!r}: expected shape {tuple(shape)}, found {tuple(value.shape)}"
        if not (value.is_floating_point() or value.is_complex()) and param.is_floating_point():
            return f"{name!r}: expected a floating dtype like the parameter's {param.dtype}, found {value.dtype}"
    return None


def _hyperparameter_conflict(groups: list[Mapping[str, Any]], numbers: list[int]) -> Optional[str]:
    """The first hyper-parameter on which ``groups`` disagree, described; ``None``."""
    first = groups[0]
    for other, number in zip(groups[1:], numbers[1:]):
        for key in dict.fromkeys([*first, *other]):
            if key in (PARAMS, "param_names"):
                continue
            a, b = first.get(key, "<absent>"), other.get(key, "<absent>")
            if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
                same = isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and torch.equal(a, b)
            else:
                same = bool(a == b)
            if not same:
                return f"{key!r}: {a!r} in group {numbers[0]}, {b!r} in group {number}"
    return None


def plan_optim_load(
    index: ParamIndex,
    optim: torch.optim.Optimizer,
    osd: Mapping[str, Any],
    options: StateDictOptions,
    problems: list[str],
) -> Optional[OptimPlan]:
    """Check ``osd`` against ``optim``; append problems instead of writing."""
    fqns = optimizer_fqns(index, optim)
    try:
        mine = _split_for(index, optim, fqns, osd)
    except (LayoutMismatchError, MissingParamIdError) as err:
        problems.append(str(err))
        return None
    loaded_groups = mine[PG]
    group_of = {}
    for gi, group in enumerate(loaded_groups):
        for key in group[PARAMS]:
            group_of[key] = gi
    state = mine[STATE]
    present = set(group_of) | set(state)
    empty_loaded = [gi for gi, g in enumerate(loaded_groups) if not g[PARAMS]]
    name = type(optim).__name__
    param_shaped = type(optim) in _PARAM_SHAPED_STATE
    current = _state_by_id(optim)
    plan_groups: list[dict[str, Any]] = []
    plan_state: dict[int, tuple[torch.Tensor, int, Mapping[str, Any]]] = {}
    osd_groups = []
    osd_state = {}
    missing = []
    for j, (group, group_fqns) in enumerate(zip(optim.param_groups, fqns)):
        chosen = [f if f not in index.tied else _pick(index, f, present) for f in group_fqns]
        sources = sorted({group_of[f] for f in chosen if f in group_of})
        if len(sources) > 1:
            # e.g. the per-parameter optimizers of _apply_optimizer_in_backward,
            # loaded into one optimizer: fine when their hyper-parameters agree
            conflict = _hyperparameter_conflict([loaded_groups[i] for i in sources], sources)
            if conflict:
                problems.append(
                    f"{name}: the parameters of param group {j} come from loaded param groups {sources}, "
                    f"whose hyper-parameters differ ({conflict}); a group must be loaded from groups that agree"
                )
                continue
        if sources:
            source = loaded_groups[sources[0]]
            if len(sources) > 1:
                source = {k: v for k, v in source.items() if k != "param_names"}
        elif not group[PARAMS] and empty_loaded:
            source = loaded_groups[empty_loaded.pop(0)]
        else:
            source = None  # keep the current hyper-parameters
            if group[PARAMS] or options.strict:
                missing.extend(chosen or [f"<empty param group {j}>"])
        hypers = {k: v for k, v in (source or group).items() if k != PARAMS}
        if "param_names" in group and "param_names" not in hypers:
            hypers["param_names"] = group["param_names"]
        plan_groups.append(hypers)
        osd_groups.append({**hypers, PARAMS: chosen})
        for param, fqn in zip(group[PARAMS], chosen):
            entry = state.get(fqn)
            if entry is None:
                if param.requires_grad and options.strict and source is not None:
                    missing.append(fqn)
                continue
            problem = _state_problem(param, entry, current.get(id(param)), param_shaped)
            if problem:
                problems.append(f"{name}: state of {fqn!r}: {problem}")
                continue
            plan_state[id(param)] = (param, j, entry)
            osd_state[fqn] = entry
    if missing and options.strict:
        problems.append(
            f"{name}: Missing key(s) (parameters with no optimizer state or param group in the "
            f"state dict): {_preview(list(dict.fromkeys(missing)))}"
        )
    return OptimPlan(plan_groups, plan_state, {STATE: osd_state, PG: osd_groups}, fqns)


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


def optim_placer(index: Index, optims: tuple[torch.optim.Optimizer, ...]) -> Optional[Callable[[tuple[Any, ...], Any], Any]]:
    """For a broadcast into optimizers of sharded parameters: keep this rank's
    shard of each parameter-shaped state tensor as it arrives (FSDP1 takes
    full tensors and shards them itself)."""
    if isinstance(index, ModelIndex):
        if index.fsdp1:
            return None
        index = index.params
    sharded: dict[str, torch.Tensor] = {}
    for optim in optims:
        for group, names in zip(optim.param_groups, optimizer_fqns(index, optim)):
            for param, fqn in zip(group[PARAMS], names):
                if is_dtensor(param):
                    sharded.update(dict.fromkeys(index.aliases(fqn), param))
    if not sharded:
        return None

    def place(path: tuple[Any, ...], tensor: Any) -> Any:
        param = sharded.get(path[1]) if len(path) == 3 and path[0] == STATE else None
        if param is not None and tensor.dim() > 0 and tensor.shape == param.shape:
            return shard_as(tensor, param)
        return tensor

    return place


def deliver_optimizers(
    index: Index, optims: tuple[torch.optim.Optimizer, ...], announced: Announcement, options: StateDictOptions
) -> list[OptimPlan]:
    """Move the announced optimizer state (the ranks have agreed on a plan
    made from its placeholders), keeping this rank's shard of each sharded
    parameter's state as it arrives; return the plans to write."""
    delivered = announced.deliver(place=optim_placer(index, optims))
    # the same keys, shapes and dtypes as the agreed plans: this cannot fail
    return plan_optimizers_load(index, optims, delivered, options)


def optimizers_sharded(optims: tuple[torch.optim.Optimizer, ...]) -> bool:
    """Whether any optimizer holds a DTensor parameter (every rank must load)."""
    return any(is_dtensor(p) for optim in optims for group in optim.param_groups for p in group[PARAMS])


def write_optimizer(optim: torch.optim.Optimizer, plan: OptimPlan) -> None:
    """The one side effect: load ``plan`` into ``optim``.

    State tensors are copied, never aliased: into the optimizer's current
    state tensor where it fits, else into new tensors (one allocation per
    dtype and device), with one batched copy.
    """
    fast = (
        type(optim).load_state_dict is torch.optim.Optimizer.load_state_dict
        and not optim._optimizer_load_state_dict_pre_hooks
    )
    if not fast:
        type(optim).load_state_dict(optim, copy.deepcopy(plan.fqn_osd))
        return
    groups = [{**copy.deepcopy(hypers), PARAMS: group[PARAMS]} for group, hypers in zip(optim.param_groups, plan.groups)]
    state: defaultdict[torch.Tensor, Any] = defaultdict(dict)
    dsts: list[Any] = []
    srcs: list[torch.Tensor] = []
    fresh: dict[torch.device, list[tuple[dict[str, Any], str, int]]] = {}
    fresh_specs: dict[torch.device, list[tuple[torch.Size, torch.dtype]]] = {}
    currents = _state_by_id(optim)
    for param, j, entry in plan.state.values():
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


def _plan_targets(index: Index, optims: tuple[torch.optim.Optimizer, ...]) -> tuple[ParamIndex, tuple[torch.optim.Optimizer, ...]]:
    """What the plans check against: the optimizers themselves, or under
    FSDP1 their views with full-shape stand-ins for the flat parameters."""
    if not isinstance(index, ModelIndex):
        return index, optims
    if index.fsdp1:
        return index.params, tuple(fsdp1.logical_optimizer(optim, index) for optim in optims)
    return index.params, optims


def plan_optimizers_load(
    index: Index, optims: tuple[torch.optim.Optimizer, ...], osd: Mapping[str, Any], options: StateDictOptions
) -> list[OptimPlan]:
    """Plan every optimizer's load, or raise with every problem found.

    ``index`` is the model's :class:`ModelIndex` when the model is sharded by
    FSDP1 (a :class:`ParamIndex` is enough otherwise)."""
    fn = "set_optimizer_state_dict"
    if not isinstance(osd, Mapping):
        raise TypeError(f"{fn}: expected an optimizer state dict (a Mapping), got {type(osd).__name__}.")
    index, optims = _plan_targets(index, optims)
    problems: list[str] = []
    plans = [plan_optim_load(index, optim, osd, options, problems) for optim in optims]
    if options.strict and is_optim_state_dict(osd) and not problems:
        known = {a for plan in plans if plan for g in plan.fqns for f in g for a in index.aliases(f)}
        if not _keyed_by_ids(osd):
            keys = list(osd[STATE]) + [k for g in osd[PG] for k in g[PARAMS]]
            unexpected = [k for k in dict.fromkeys(keys) if k not in known]
            if unexpected:
                problems.append(
                    f"Unexpected key(s) (parameters the optimizers do not hold): {_preview(unexpected)}"
                )
    if problems:
        hint = " Pass options=StateDictOptions(strict=False) to skip missing and unexpected keys."
        raise IncompatibleStateDictError(
            f"{fn}: cannot load: " + "; ".join(problems).rstrip(".") + f". Nothing was written.{hint if options.strict else ''}"
        )
    return [plan for plan in plans if plan is not None]


def write_optimizers(
    model: nn.Module, optims: tuple[torch.optim.Optimizer, ...], plans: list[OptimPlan], index: Index
) -> None:
    """Write validated plans: directly, or through FSDP for FSDP1 models."""
    for optim, plan in zip(optims, plans):
        if isinstance(index, ModelIndex) and index.fsdp1:
            fsdp1.write_optimizer(model, optim, index, plan.fqn_osd)
        else:
            write_optimizer(optim, plan)


@without_gc
def set_optimizer_state_dict(
    model: nn.Module,
    optimizers: Optimizers,
    optim_state_dict: dict[str, Any],
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
    index: Index = index_params(model, opts.dsd_fqn_modifiers, attr_names=_has_param_names(optims))
    if index.fsdp1:
        index = index_model(model, opts.dsd_fqn_modifiers)
    planned, announced = announce_load(optim_state_dict, opts, "set_optimizer_state_dict")
    plans = agree(
        "set_optimizer_state_dict",
        opts.broadcast_from_rank0 or optimizers_sharded(optims) or index.fsdp1,
        lambda: plan_optimizers_load(index, optims, planned, opts),
    )
    if announced is not None:
        plans = deliver_optimizers(index, optims, announced, opts)
    write_optimizers(model, optims, plans, index)


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
