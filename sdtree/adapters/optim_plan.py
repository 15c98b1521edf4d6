"""Plan the load of optimizers' state: every check, no write.

:func:`plan_optimizers_load` takes the state dict as given (nested or flat,
keyed by FQNs or by parameter ids, of one optimizer or merged from several),
brings it once to each optimizer's FQN-keyed nested form (a transform the
plan keeps, see :attr:`OptimPlan.normalize`), and checks the group layout,
keys, shapes and leaf types of every optimizer before any is written. Its
:class:`OptimizersPlan` is decisions only: which loaded group each group
takes its hyper-parameters from, which entry each parameter's state. Bound
to the tensors (:meth:`OptimizersPlan.bind`: the given ones, or those a
broadcast delivered for the placeholders the plan was made on), it gives
the :class:`~sdtree.adapters.index.OptimWrite` each optimizer's IO writes.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Optional

import attrs
import torch

from sdtree.adapters.index import ModelIndex, OptimWrite, ParamIndex, ids_to_fqns
from sdtree.adapters.model_plan import sharded_placer
from sdtree.errors import IncompatibleStateDictError, LayoutMismatchError, MissingParamIdError, api_name, preview
from sdtree.fqn import split_flat_keys
from sdtree.transforms import OptimizerLayout, Transform, identity, select_keys, unflatten_optimizer
from sdtree.transforms.tensors import is_dtensor
from sdtree.types import PARAMS, PG, STATE, StateDict, is_optim_state_dict

__all__ = ["OptimPlan", "OptimizersPlan", "plan_optimizers_load"]

# Built-in optimizers whose every non-scalar state tensor has its parameter's shape.
_PARAM_SHAPED_STATE = tuple(
    getattr(torch.optim, name)
    for name in ("Adam", "AdamW", "SGD", "Adagrad", "RMSprop", "Adadelta", "Adamax", "NAdam", "RAdam", "ASGD", "Rprop")
    if hasattr(torch.optim, name)
)
_NAMES = "param_names"


@attrs.frozen(eq=False)
class OptimPlan:
    """A validated load of one optimizer: what it takes from the loaded state dict.

    Attributes:
        view: what was checked: the optimizer, or FSDP1's view of it
            (:meth:`~sdtree.adapters.index.StateDictIO.plan_view`).
        fqns: the FQN of each of its parameters, by group.
        normalize: the loaded state dict -> this optimizer's part of it,
            FQN-keyed and nested (computed once, applied again to the
            delivered tensors of a broadcast).
        groups: for each group, the loaded group it takes its
            hyper-parameters from (``None``: it keeps its own), and whether
            several loaded groups (that agree) were merged into it.
        state: ``(parameter, group, FQN)`` for each parameter whose state is
            loaded, the FQN as the loaded state dict spells it.
        chosen: each group's FQNs as the loaded state dict spells them.
    """

    view: torch.optim.Optimizer
    fqns: list[list[str]]
    normalize: Transform
    groups: tuple[tuple[Optional[int], bool], ...]
    state: tuple[tuple[torch.Tensor, int, str], ...]
    chosen: list[list[str]]

    def bind(self, osd: StateDict) -> OptimWrite:
        """What to write, with the values of ``osd`` (the state dict the plan
        was made on, or one of its structure: the delivered tensors)."""
        mine = self.normalize(osd)
        loaded_groups = mine[PG]
        groups = []
        fqn_groups = []
        for group, (source, merged), chosen in zip(self.view.param_groups, self.groups, self.chosen):
            origin = loaded_groups[source] if source is not None else group
            hypers = {k: v for k, v in origin.items() if k != PARAMS and not (merged and k == _NAMES)}
            if _NAMES in group and _NAMES not in hypers:
                hypers[_NAMES] = group[_NAMES]
            groups.append(hypers)
            fqn_groups.append({**hypers, PARAMS: chosen})
        loaded_state = mine[STATE]
        state = {}
        fqn_state = {}
        for param, j, fqn in self.state:
            entry = loaded_state[fqn]
            state[id(param)] = (param, j, entry)
            fqn_state[fqn] = entry
        return OptimWrite(groups, state, {STATE: fqn_state, PG: fqn_groups})


@attrs.frozen(eq=False)
class OptimizersPlan:
    """The validated loads of several optimizers, from one state dict."""

    plans: tuple[OptimPlan, ...]
    params: ParamIndex

    def bind(self, osd: StateDict) -> list[OptimWrite]:
        return [plan.bind(osd) for plan in self.plans]

    def templates(self) -> Optional[Callable[[tuple[Any, ...]], Any]]:
        """For a broadcast into optimizers of sharded parameters: the DTensor
        parameter each parameter-shaped state tensor is sharded as (``None``
        when no parameter is a DTensor; FSDP1's views hold none, as FSDP
        takes full tensors and shards them itself)."""
        sharded: dict[str, torch.Tensor] = {}
        for plan in self.plans:
            for group, names in zip(plan.view.param_groups, plan.fqns):
                for param, fqn in zip(group[PARAMS], names):
                    if is_dtensor(param):
                        sharded.update(dict.fromkeys(self.params.aliases(fqn), param))
        if not sharded:
            return None
        return lambda path: sharded.get(path[1]) if len(path) == 3 and path[0] == STATE else None

    def placer(self) -> Optional[Callable[[tuple[Any, ...], Any], Any]]:
        """For a broadcast into optimizers of sharded parameters: keep this
        rank's shard of each parameter-shaped state tensor as it arrives."""
        return sharded_placer(self.templates())


def plan_optimizers_load(
    index: ModelIndex, optims: tuple[torch.optim.Optimizer, ...], osd: StateDict, *, strict: bool
) -> OptimizersPlan:
    """Plan every optimizer's load from ``osd``, or raise with every problem found.

    Raises:
        IncompatibleStateDictError (a RuntimeError): missing state under
            ``strict``, state of the wrong shape or leaf type, groups that do
            not match, keys the optimizers do not hold (under ``strict``).
        MissingParamIdError: an optimizer holds a parameter the model lacks.
    """
    fn = api_name()
    if not isinstance(osd, Mapping):
        raise TypeError(f"{fn}: expected an optimizer state dict (a Mapping), got {type(osd).__name__}.")
    params = index.params
    nested = is_optim_state_dict(osd)
    by_ids = nested and _keyed_by_ids(osd)
    problems: list[str] = []
    plans = []
    for optim in optims:
        plan = _plan_one(params, index.io.plan_view(optim, index), osd, nested, by_ids, strict, problems)
        if plan is not None:
            plans.append(plan)
    if strict and nested and not by_ids and not problems:
        known = {a for plan in plans for g in plan.fqns for f in g for a in params.aliases(f)}
        keys = list(osd[STATE]) + [k for g in osd[PG] for k in g[PARAMS]]
        unexpected = [k for k in dict.fromkeys(keys) if k not in known]
        if unexpected:
            problems.append(f"Unexpected key(s) (parameters the optimizers do not hold): {preview(unexpected)}")
    if problems:
        hint = " Pass options=StateDictOptions(strict=False) to skip missing and unexpected keys." if strict else ""
        raise IncompatibleStateDictError(f"{fn}: cannot load: " + "; ".join(problems).rstrip(".") + f". Nothing was written.{hint}")
    return OptimizersPlan(tuple(plans), params)


def _keyed_by_ids(osd: StateDict) -> bool:
    """Whether the nested optimizer state dict ``osd`` names parameters by
    ids (as ``optim.state_dict()`` does), not by FQNs."""
    keys = list(osd[STATE]) + [k for g in osd[PG] for k in g[PARAMS]]
    return bool(keys) and all(isinstance(k, int) for k in keys)


def _normalized(
    params: ParamIndex, optim: torch.optim.Optimizer, fqns: list[list[str]], osd: StateDict, nested: bool, by_ids: bool
) -> tuple[Transform, Mapping[str, Any]]:
    """The transform that brings ``osd`` to ``optim``'s part of it, FQN-keyed
    and nested, and its result on ``osd``."""
    if nested:
        # Parameter ids, as from optim.state_dict(): positional, as torch loads them.
        normalize = ids_to_fqns(fqns) if by_ids else identity()
        mine: Mapping[str, Any] = normalize(osd)
        return normalize, mine
    aliases = {a for group in fqns for f in group for a in params.aliases(f)}
    select = select_keys(where=aliases.__contains__)
    flat_mine = select(osd)
    present = {fqn for _, fqn, _ in split_flat_keys(flat_mine, api_name())} if flat_mine else set()
    layout = OptimizerLayout(
        [[_pick(params, f, present) for f in group] for group in fqns],
        empty_group_hyperparams={
            i: {k: v for k, v in g.items() if k != PARAMS} for i, g in enumerate(optim.param_groups) if not g[PARAMS]
        },
    )
    unflatten = unflatten_optimizer(layout)
    mine = unflatten(flat_mine)
    return select >> unflatten, mine


def _pick(params: ParamIndex, fqn: str, present: Any) -> str:
    """The FQN under which a (possibly tied) parameter appears in the loaded state dict."""
    for alias in params.aliases(fqn):
        if alias in present:
            return alias
    return fqn


def _plan_one(
    params: ParamIndex,
    optim: torch.optim.Optimizer,
    osd: StateDict,
    nested: bool,
    by_ids: bool,
    strict: bool,
    problems: list[str],
) -> Optional[OptimPlan]:
    """Check ``osd`` against ``optim`` (or its view); append problems instead of raising."""
    fqns = params.optimizer_fqns(optim)
    try:
        normalize, mine = _normalized(params, optim, fqns, osd, nested, by_ids)
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
    current = {id(param): entry for param, entry in optim.state.items()}  # no Python-level tensor hashing
    plan_groups: list[tuple[Optional[int], bool]] = []
    plan_state: list[tuple[torch.Tensor, int, str]] = []
    plan_chosen = []
    missing = []
    for j, (group, group_fqns) in enumerate(zip(optim.param_groups, fqns)):
        chosen = [f if f not in params.tied else _pick(params, f, present) for f in group_fqns]
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
        source: Optional[int] = None  # keep the current hyper-parameters
        if sources:
            source = sources[0]
        elif not group[PARAMS] and empty_loaded:
            source = empty_loaded.pop(0)
        elif group[PARAMS] or strict:
            missing.extend(chosen or [f"<empty param group {j}>"])
        plan_groups.append((source, len(sources) > 1))
        plan_chosen.append(chosen)
        for param, fqn in zip(group[PARAMS], chosen):
            entry = state.get(fqn)
            if entry is None:
                if param.requires_grad and strict and source is not None:
                    missing.append(fqn)
                continue
            problem = _state_problem(param, entry, current.get(id(param)), param_shaped)
            if problem:
                problems.append(f"{name}: state of {fqn!r}: {problem}")
                continue
            plan_state.append((param, j, fqn))
    if missing and strict:
        problems.append(
            f"{name}: Missing key(s) (parameters with no optimizer state or param group in the "
            f"state dict): {preview(list(dict.fromkeys(missing)))}"
        )
    return OptimPlan(optim, fqns, normalize, tuple(plan_groups), tuple(plan_state), plan_chosen)


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
            if key in (PARAMS, _NAMES):
                continue
            a, b = first.get(key, "<absent>"), other.get(key, "<absent>")
            if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
                same = isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and torch.equal(a, b)
            else:
                same = bool(a == b)
            if not same:
                return f"{key!r}: {a!r} in group {numbers[0]}, {b!r} in group {number}"
    return None
