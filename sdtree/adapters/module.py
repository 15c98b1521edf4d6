"""Read and write a model's state dict: ``get_model_state_dict`` and
``set_model_state_dict`` (torch's signatures and results).

``get``: read (one walk, then the entries or ``model.state_dict()``) ->
pipeline (canonical FQNs, submodule selection, frozen parameters,
gather/offload). ``set``: canonical state dict -> plan (every check, no
write) -> one write, module by module through each module's own
``_load_from_state_dict``, so the cost stays linear in the number of keys.
With ``broadcast_from_rank0`` the plan is made on rank 0's announced
shapes and dtypes, and the tensors are delivered (into the parameters
where they fit) only once every rank has agreed to it.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple, Optional

import torch
from torch import nn
from torch.nn.modules.module import _IncompatibleKeys

from sdtree.adapters import fsdp1
from sdtree.adapters._common import agree, announce_load, check_model_not_empty, finish, warn_submodules, without_gc
from sdtree.adapters.index import Entry, ModelIndex, customises_save, index_model, iter_modules, type_traits
from sdtree.errors import IncompatibleStateDictError, _preview
from sdtree.options import StateDictOptions, as_options
from sdtree.transforms import Transform, drop_keys, identity, rename, select_keys
from sdtree.transforms.distributed import Announcement, shard_as, shard_like

__all__ = ["get_model_state_dict", "set_model_state_dict", "patch_model_state_dict"]


def read_model(model: nn.Module, dsd_fqn_modifiers: str) -> Optional[tuple[dict[str, Any], frozenset[str]]]:
    """Read the state dict, keyed by canonical FQNs, and the frozen FQNs, in one
    walk, as ``nn.Module.state_dict()`` would produce it; ``None`` when a module
    customises saving (then ``state_dict()`` itself must be called)."""
    out: dict[str, Any] = {}
    frozen = []
    for module, _, _, fqn in iter_modules(model, dsd_fqn_modifiers):
        if customises_save(module):
            return None
        _, _, extra = type_traits(type(module))
        for name, param in module._parameters.items():
            if param is not None:
                out[fqn + name] = param.detach()
                if not param.requires_grad:
                    frozen.append(fqn + name)
        if module._buffers:
            non_persistent = module._non_persistent_buffers_set
            for name, buffer in module._buffers.items():
                if buffer is not None and name not in non_persistent:
                    out[fqn + name] = buffer.detach()
        if extra:
            out[fqn + "_extra_state"] = module.get_extra_state()
    return out, frozenset(frozen)


def read_model_through_state_dict(model: nn.Module, index: ModelIndex) -> dict[str, Any]:
    """``model.state_dict()`` (hooks and overrides honoured), keyed by canonical FQNs."""
    state_dict: dict[str, Any] = rename(dict(index.key_to_fqn))(type(model).state_dict(model))
    return state_dict


def _submodule_prefixes(index: ModelIndex, submodules: Any) -> list[str]:
    wanted = {id(m) for m in submodules}
    return list(dict.fromkeys(fqn for _, fqn, module in index.modules if id(module) in wanted))


def model_pipeline(
    options: StateDictOptions, frozen: frozenset[str], submodule_prefixes: Optional[list[str]] = None
) -> Transform:
    """The pure steps from the canonical state dict to what ``get`` returns."""
    t = identity()
    if submodule_prefixes is not None:
        prefixes = submodule_prefixes
        t = t >> select_keys(*prefixes) if prefixes else t >> select_keys(where=lambda _: False)
        if prefixes and not options.keep_submodule_prefixes:
            t = t >> rename([("^(?:" + "|".join(map(re.escape, prefixes)) + ")", "")])
    if options.ignore_frozen_params and frozen:
        t = t >> drop_keys(where=frozen.__contains__)
    return t >> finish(options)


@without_gc
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
    fast = None if submodules else read_model(model, opts.dsd_fqn_modifiers)
    if fast is not None:
        raw, frozen = fast
        prefixes = None
    else:
        index = index_model(model, opts.dsd_fqn_modifiers)
        raw = fsdp1.read_model(model, index) if index.fsdp1 else read_model_through_state_dict(model, index)
        frozen = index.frozen
        prefixes = _submodule_prefixes(index, submodules) if submodules else None
    state_dict: dict[str, Any] = model_pipeline(opts, frozen, prefixes)(raw)
    check_model_not_empty(state_dict, opts, loading=False)
    return state_dict


# -- loading ------------------------------------------------------------------


class ModelPlan(NamedTuple):
    """What a validated model load will write."""

    values: dict[str, Any]  # canonical FQN -> value, only keys of the model
    missing: list[str]
    unexpected: list[str]
    sources: dict[str, str]  # canonical FQN -> the key of the state dict its value comes from


def _kind(dtype: torch.dtype) -> str:
    if dtype == torch.bool:
        return "bool"
    if dtype.is_complex:
        return "complex"
    return "float" if dtype.is_floating_point else "int"


def value_problem(target: torch.Tensor, value: Any) -> Optional[str]:
    """Why ``value`` cannot be copied into ``target`` (None when it can)."""
    if not isinstance(value, torch.Tensor):
        return f"expected a tensor, found {type(value).__name__}"
    if value.shape != target.shape:
        return f"expected shape {tuple(target.shape)}, found {tuple(value.shape)}"
    if value.dtype != target.dtype and _kind(value.dtype) != _kind(target.dtype):
        return f"expected dtype {target.dtype} (or another {_kind(target.dtype)} dtype), found {value.dtype}"
    return None


def plan_model_load(
    index: ModelIndex, state_dict: Mapping[str, Any], options: StateDictOptions, fn: str
) -> ModelPlan:
    """Check ``state_dict`` against the model; raise before anything is written."""
    entries = index.entries
    params = index.params
    missing = []
    for fqn, entry in entries.items():
        if fqn in state_dict:
            continue
        if entry.kind == "param" and any(alias in state_dict for alias in params.aliases(fqn)):
            continue  # a tied parameter, present under another of its FQNs
        missing.append(fqn)
    unexpected = [key for key in state_dict if key not in entries]
    bad = []
    values = {}
    for key, value in state_dict.items():
        target = entries.get(key)
        if target is None:
            continue
        if target.kind != "extra":
            problem = value_problem(target.value, value)
            if problem:
                bad.append(f"{key!r}: {problem}")
                continue
        values[key] = value
    sources = {key: key for key in values}
    for fqn in missing:  # fill tied parameters from their present alias
        entry = entries[fqn]
        if entry.kind == "param":
            for alias in params.aliases(fqn):
                if alias in values:
                    values[fqn] = values[alias]
                    sources[fqn] = alias
                    break
    missing = [fqn for fqn in missing if fqn not in values]
    if index.sharded:  # full tensors into sharded parameters: keep each rank's slice
        values = shard_like(index.sharded)(values)
    # ignore_frozen_params: absent frozen parameters are reported, as torch does, but not required
    required = [fqn for fqn in missing if fqn not in index.frozen] if options.ignore_frozen_params else missing
    problems = []
    if options.strict and required:
        problems.append(f"Missing key(s) in state_dict: {_preview(required)}")
    if options.strict and unexpected:
        problems.append(f"Unexpected key(s) in state_dict: {_preview(unexpected)}")
    if bad:
        problems.append(f"{len(bad)} value(s) do not fit: {_preview(bad, quote=False)}")
    if problems:
        hint = (
            " Pass options=StateDictOptions(strict=False) to load the keys that match and get "
            "the others back as missing_keys/unexpected_keys."
            if options.strict and (required or unexpected)
            else ""
        )
        raise IncompatibleStateDictError(
            f"{fn}: cannot load into {type(index.modules[0][2]).__name__}: "
            + "; ".join(problems).rstrip(".")
            + f". Nothing was written.{hint}"
        )
    return ModelPlan(values, missing, unexpected, sources)


def model_placer(index: ModelIndex) -> Optional[Callable[[tuple[Any, ...], Any], Any]]:
    """For a broadcast into a sharded model: keep this rank's shard of each
    tensor as it arrives (``None`` when nothing is sharded)."""
    templates = index.sharded
    if not templates:
        return None

    def place(path: tuple[Any, ...], tensor: Any) -> Any:
        template = templates.get(path[0]) if len(path) == 1 else None
        if template is not None and tensor.dim() > 0 and tensor.shape == template.shape:
            return shard_as(tensor, template)
        return tensor

    return place


def model_destinations(index: ModelIndex, plan: ModelPlan) -> dict[str, torch.Tensor]:
    """For a broadcast load: the model's own tensors that values may be
    received straight into (by state-dict key), so that the load needs no
    memory beyond its buckets. Only plain parameters and buffers with memory,
    not in inference mode, of modules that load through ``nn.Module``'s own
    ``_load_from_state_dict`` with no load pre-hooks (those must see every
    key), and each written from one key only (two keys of a tied parameter
    go through :func:`write_model`, where the last one wins as in torch)."""
    if index.fsdp1 or not index.plain_load:
        return {}
    base = nn.Module._load_from_state_dict
    targets: dict[str, torch.Tensor] = {}
    keys_of: dict[int, list[str]] = {}
    for fqn, key in plan.sources.items():
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


def deliver_model(index: ModelIndex, announced: Announcement, plan: ModelPlan, *, in_place: bool) -> ModelPlan:
    """Move the announced tensors (the ranks have agreed on ``plan``, made
    from the placeholders), as this rank's shard where the model is sharded,
    and with ``in_place`` straight into the model's tensors where they fit
    (:func:`model_destinations`); return the plan of what :func:`write_model`
    still writes."""
    targets = model_destinations(index, plan) if in_place else {}
    into = (lambda path: targets.get(path[0]) if len(path) == 1 else None) if targets else None
    delivered = announced.deliver(place=model_placer(index), into=into)
    pending = {}
    for fqn, key in plan.sources.items():
        value = delivered[key]
        if key not in targets or targets[key] is not value:  # else written already
            pending[fqn] = value
    if index.sharded:  # as plan_model_load does (tensors the placer left whole)
        pending = shard_like(index.sharded)(pending)
    return plan._replace(values=pending)


def write_model(model: nn.Module, index: ModelIndex, plan: ModelPlan) -> None:
    """The one side effect: load ``plan.values`` into the model.

    Parameters and buffers on the meta device (a model built without
    memory) are replaced by the loaded tensors (``assign``), the others are
    copied into.
    """
    if index.fsdp1:
        fsdp1.write_model(model, index, plan.values)
        return
    entries = index.entries
    if not index.plain_load:
        raw = {entries[fqn].prefix + entries[fqn].name: value for fqn, value in plan.values.items()}
        assign = any(e.kind != "extra" and e.value.is_meta for e in entries.values())
        type(model).load_state_dict(model, raw, strict=False, assign=assign)
        return
    by_module: dict[int, dict[str, Any]] = {}
    on_meta: set[int] = set()
    for fqn, value in plan.values.items():
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
        raise RuntimeError(f"set_model_state_dict: error(s) while loading: {'; '.join(errors)}")
    incompatible = _IncompatibleKeys(list(plan.missing), list(plan.unexpected))
    for _, _, module in reversed(index.modules):
        for hook in module._load_state_dict_post_hooks.values():
            hook(module, incompatible)


def module_keyed_to_fqns(state_dict: Mapping[Any, Any], index: ModelIndex) -> Mapping[str, Any]:
    """Accept the deprecated ``{submodule: its state dict}`` input."""
    if not state_dict or not isinstance(next(iter(state_dict)), nn.Module):
        return state_dict
    warnings.warn(
        "Passing model_state_dict as a ``Dict[nn.Module, Dict[str, Any]]``"
        "is deprecated and will be removed in 2.5. If you need this "
        "feature, please preprocess the model_state_dict to achieve the "
        "same functionality.",
        FutureWarning,
        stacklevel=3,
    )
    prefix_of: dict[int, str] = {}
    for _, fqn, module in index.modules:
        prefix_of.setdefault(id(module), fqn)
    out: dict[str, Any] = {}
    for submodule, sub_state_dict in state_dict.items():
        prefix = prefix_of.get(id(submodule))
        if prefix is None:
            raise ValueError(
                f"set_model_state_dict: {type(submodule).__name__} is a key of the state dict "
                "but not a submodule of the model. Key the state dict by FQNs instead."
            )
        out.update({prefix + key: value for key, value in sub_state_dict.items()})
    return out


@without_gc
def set_model_state_dict(
    model: nn.Module,
    model_state_dict: dict[str, Any],
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
    fn = "set_model_state_dict"
    planned, announced = announce_load(state_dict, opts, fn)
    plan = agree(fn, opts.broadcast_from_rank0 or index.distributed, lambda: plan_model_load(index, planned, opts, fn))
    if announced is not None:
        plan = deliver_model(index, announced, plan, in_place=True)
    write_model(model, index, plan)
    return _IncompatibleKeys(plan.missing, plan.unexpected)


def patch_model_state_dict(model: nn.Module, *, options: Optional[StateDictOptions] = None) -> None:
    """Make ``model.state_dict()`` / ``model.load_state_dict(sd)`` call
    :func:`get_model_state_dict` / :func:`set_model_state_dict` with ``options``."""

    def state_dict(*args: Any, **kwargs: Any) -> dict[str, Any]:
        return get_model_state_dict(model, options=options)

    def load_state_dict(state_dict: dict[str, Any], *args: Any, **kwargs: Any) -> _IncompatibleKeys:
        return set_model_state_dict(model, state_dict, options=options)

    model.state_dict = state_dict  # type: ignore[method-assign,assignment]
    model.load_state_dict = load_state_dict  # type: ignore[method-assign,assignment]
