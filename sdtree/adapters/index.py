"""What the one walk over a model records (:mod:`sdtree.adapters.walk` builds
it), what is read off that, and the protocol of the model's reads and writes.

:class:`ModelIndex` holds every module path of the model and the
:class:`StateDictIO` that reads and writes this model's state: the plain one
(:mod:`sdtree.adapters.plain`) or FSDP1's (:mod:`sdtree.adapters.fsdp1`),
chosen once, by the walk. Off the paths it reads, when first needed: for
every entry ``model.state_dict()`` yields (parameters, persistent buffers,
``_extra_state``) its canonical FQN, the module that owns it and the path
through which that module's own ``_load_from_state_dict`` expects it
(:class:`Entry`); the parameters' names (:class:`ParamIndex`, what
optimizers are named by); frozen and sharded parameters.
:class:`ModelWrite` and :class:`OptimWrite` are what a validated load hands
the IO to write.

Everything here is immutable and built per call: nothing caches a model.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Literal, NamedTuple, Optional, Protocol

import attrs
import torch
from torch import nn

from sdtree.errors import MissingParamIdError, preview
from sdtree.transforms import Transform, param_ids_to_fqns
from sdtree.transforms.tensors import is_dtensor
from sdtree.types import PARAMS

__all__ = [
    "Entry",
    "ParamIndex",
    "ModelIndex",
    "ModulePath",
    "Kind",
    "StateDictIO",
    "ModelWrite",
    "OptimWrite",
    "ids_to_fqns",
]

_EXTRA_STATE = "_extra_state"


Kind = Literal["param", "buffer", "extra"]


class Entry(NamedTuple):
    """One state-dict entry of a model."""

    fqn: str  # canonical
    module: nn.Module  # owner
    name: str  # the owner's local name ("weight", "_extra_state")
    prefix: str  # the owner's prefix for _load_from_state_dict (attribute path)
    kind: Kind
    value: Any  # the parameter or buffer (None for extra state)


@attrs.frozen(eq=False, slots=False)
class ParamIndex:
    """The parameters' names: what optimizers are named by.

    Parameters are keyed by ``id``: a tensor's own hash is a Python call.

    Attributes:
        first_fqn: ``id(parameter)`` -> its first canonical FQN (the one
            ``named_parameters()`` reaches first).
        tied: FQN -> every FQN of its parameter, for tied parameters only.
        model: the index these names were read off.
    """

    first_fqn: Mapping[int, str]
    tied: Mapping[str, tuple[str, ...]]
    model: ModelIndex

    @functools.cached_property
    def attr_to_fqn(self) -> Mapping[str, str]:
        """Name as ``model.named_parameters()`` spells it -> FQN (read off the
        model's paths when first needed: only optimizers built from
        ``named_parameters()`` name their parameters so)."""
        return self.model._attr_names()

    def fqn_of_param(self, param: torch.Tensor) -> str | None:
        return self.first_fqn.get(id(param))

    def aliases(self, fqn: str) -> tuple[str, ...]:
        """Every FQN of the parameter named ``fqn`` (one, unless tied)."""
        return self.tied.get(fqn, (fqn,))

    def optimizer_fqns(self, optim: torch.optim.Optimizer) -> list[list[str]]:
        """The canonical FQN of every parameter of each of ``optim``'s groups.

        Groups that carry ``param_names`` (optimizers built from
        ``named_parameters()``) are named by them; otherwise by the model.

        Raises:
            MissingParamIdError: a parameter of ``optim`` is not the model's.
        """
        groups: list[list[str]] = []
        unknown = []
        for g, group in enumerate(optim.param_groups):
            names = group.get("param_names")
            fqns: list[str] = []
            for i, param in enumerate(group[PARAMS]):
                fqn = self.attr_to_fqn.get(names[i]) if names else None
                fqn = fqn or self.fqn_of_param(param) or (names[i] if names else None)
                if fqn is None:
                    unknown.append(f"param_groups[{g}]['params'][{i}] (shape {tuple(param.shape)})")
                fqns.append(fqn or "")
            groups.append(fqns)
        if unknown:
            raise MissingParamIdError(
                f"{type(optim).__name__}: {len(unknown)} parameter(s) of the optimizer are not "
                f"parameters of the model: {preview(unknown, quote=False)}. Pass the model the "
                "optimizer was built for, or build the optimizer from model.named_parameters()."
            )
        return groups


def ids_to_fqns(fqns: Sequence[Sequence[str]]) -> Transform:
    """Re-key an optimizer state dict by position: ``Optimizer.state_dict()``
    numbers parameters in group order (``fqns``: one list per group)."""
    return param_ids_to_fqns(dict(enumerate(f for group in fqns for f in group)))


@attrs.frozen(eq=False)
class ModelWrite:
    """What a validated model load writes (a plan bound to its tensors)."""

    values: dict[str, Any]  # canonical FQN -> value, only keys of the model
    missing: list[str]
    unexpected: list[str]


@attrs.frozen(eq=False)
class OptimWrite:
    """What a validated optimizer load writes (a plan bound to its tensors)."""

    groups: list[dict[str, Any]]  # hyper-parameters for each group (no "params")
    state: dict[int, tuple[torch.Tensor, int, Mapping[str, Any]]]  # id(param) -> (param, group, entry)
    fqn_osd: dict[str, Any]  # the same, as an FQN-keyed state dict for Optimizer.load_state_dict


class StateDictIO(Protocol):
    """How a model's state is read and written: chosen once per model by the
    walk. :class:`~sdtree.adapters.plain.PlainIO` reads and writes through
    the modules and optimizers themselves; :class:`~sdtree.adapters.fsdp1.FSDP1IO`
    through FSDP1's own state-dict hooks, which alone can expand its flat
    parameters."""

    @property
    def collective(self) -> bool:
        """Whether reads and writes run collectives (every rank must load)."""

    def params_of(self, module: nn.Module) -> Iterator[tuple[str, Any, Optional[Any]]]:
        """``(name, parameter or None, full-shape stand-in or None)`` for
        ``module``'s parameters, as ``model.state_dict()`` lists them (a
        ``None`` parameter is skipped)."""

    def read_model(self, model: nn.Module, index: ModelIndex) -> dict[str, Any]:
        """The model's state dict, keyed by canonical FQNs."""

    def read_optimizer(self, model: nn.Module, optim: torch.optim.Optimizer, index: ModelIndex) -> dict[str, Any]:
        """``optim``'s state dict, keyed by canonical FQNs (for an optimizer
        with no state yet, the state one step would create)."""

    def plan_view(self, optim: torch.optim.Optimizer, index: ModelIndex) -> torch.optim.Optimizer:
        """What a load plan checks against: ``optim``, or a view of it
        holding its parameters' full-shape stand-ins."""

    def destinations(self, index: ModelIndex, sources: Mapping[str, str]) -> dict[str, torch.Tensor]:
        """The model's own tensors a broadcast may receive straight into, by
        state-dict key (``sources``: FQN -> the key its value comes from)."""

    def write_model(self, model: nn.Module, index: ModelIndex, write: ModelWrite) -> None:
        """Load a validated model write."""

    def write_optimizer(self, model: nn.Module, optim: torch.optim.Optimizer, index: ModelIndex, write: OptimWrite) -> None:
        """Load a validated optimizer write."""


ModulePath = tuple[nn.Module, str, str, str]  # (module, attribute prefix, state-dict key prefix, FQN prefix)


@attrs.frozen(eq=False, slots=False)
class ModelIndex:
    """Immutable facts about a model's state-dict entries.

    The walk records every module path and how the model's state is read
    and written; the facts below are read off those paths the first time
    they are needed (each once per index), so a call pays only for what it
    uses: a ``get`` of a plain model reads its tensors straight off the
    paths (:func:`~sdtree.adapters.plain.read_off_paths`) and builds no
    :class:`Entry`.

    Attributes:
        paths: ``(module, attribute prefix, state-dict key prefix, FQN
            prefix)`` for every module path, in ``state_dict()`` order (a
            shared module appears once per path; the root comes first).
        io: how this model's state is read and written; it also lists each
            module's parameters as ``state_dict()`` does (FSDP1 holds them
            in flat parameters).
    """

    paths: tuple[ModulePath, ...]
    io: StateDictIO

    @functools.cached_property
    def plain_save(self) -> bool:
        """No module customises saving (hooks or overrides), so the state dict
        can be read off the paths without ``state_dict()``. Looked up on every
        call, as ``nn.Module.state_dict`` does: a class may change after its
        first use."""
        base_save, base_save_to = nn.Module.state_dict, nn.Module._save_to_state_dict
        for module, _, _, _ in self.paths:
            cls: Any = type(module)
            if cls.state_dict is not base_save or cls._save_to_state_dict is not base_save_to:
                return False
            if module._state_dict_hooks or module._state_dict_pre_hooks:
                return False
        return True

    @property
    def plain_load(self) -> bool:
        """The root does not override ``load_state_dict``, so each module's
        ``_load_from_state_dict`` can be called with its own keys."""
        return type(self.paths[0][0]).load_state_dict is nn.Module.load_state_dict

    @functools.cached_property
    def modules(self) -> tuple[tuple[str, str, nn.Module], ...]:
        """``(attribute prefix, FQN prefix, module)`` for every module path, in load order."""
        return tuple((attr, fqn, module) for module, attr, _, fqn in self.paths)

    @property
    def entries(self) -> Mapping[str, Entry]:
        """Canonical FQN -> :class:`Entry`, in ``model.state_dict()`` order
        (each path of a shared parameter or module is its own FQN)."""
        return self._entries[0]

    @property
    def key_to_fqn(self) -> Mapping[str, str]:
        """Key as ``model.state_dict()`` spells it -> canonical FQN."""
        return self._entries[1]

    @property
    def sharded(self) -> Mapping[str, Any]:
        """FQN -> DTensor, for every parameter and buffer that is one (every
        rank must take part in a load of such a model)."""
        return self._entries[2]

    @functools.cached_property
    def frozen(self) -> frozenset[str]:
        """FQNs of parameters with ``requires_grad=False``."""
        return frozenset(fqn + name for _, _, _, fqn, name, param, _ in self._params() if not param.requires_grad)

    @property
    def distributed(self) -> bool:
        """Whether every rank must take part in a load of this model."""
        return self.io.collective or bool(self.sharded)

    def _params(self) -> Iterator[tuple[nn.Module, str, str, str, str, Any, Optional[Any]]]:
        """``(module, attribute prefix, key prefix, FQN prefix, name, parameter,
        stand-in or None)`` for every parameter of every path, in order."""
        params_of = self.io.params_of
        for module, attr, key, fqn in self.paths:
            for name, param, stand_in in params_of(module):
                if param is not None:
                    yield module, attr, key, fqn, name, param, stand_in

    def state(self) -> Iterator[tuple[nn.Module, str, str, str, str, Kind, Any]]:
        """``(module, attribute prefix, key prefix, FQN prefix, name, kind,
        value)`` for every entry of ``model.state_dict()``, in its order:
        each path's parameters (their full-shape stand-ins under FSDP1),
        persistent buffers and extra state (value ``None``: it is the
        module's to give)."""
        params_of = self.io.params_of
        for module, attr, key, fqn in self.paths:
            for name, param, stand_in in params_of(module):
                if param is not None:
                    yield module, attr, key, fqn, name, "param", param if stand_in is None else stand_in
            if module._buffers:
                non_persistent = module._non_persistent_buffers_set
                for name, buffer in module._buffers.items():
                    if buffer is not None and name not in non_persistent:
                        yield module, attr, key, fqn, name, "buffer", buffer
            if _has_extra_state(module):
                yield module, attr, key, fqn, _EXTRA_STATE, "extra", None

    @functools.cached_property
    def _entries(self) -> tuple[dict[str, Entry], dict[str, str], dict[str, Any]]:
        entries: dict[str, Entry] = {}
        key_to_fqn: dict[str, str] = {}
        for module, attr, key, fqn, name, kind, value in self.state():
            canonical = fqn + name
            entries[canonical] = Entry(canonical, module, name, attr, kind, value)
            key_to_fqn[key + name] = canonical
        sharded = {fqn: e.value for fqn, e in entries.items() if e.kind != "extra" and is_dtensor(e.value)}
        return entries, key_to_fqn, sharded

    @functools.cached_property
    def params(self) -> ParamIndex:
        """The parameters' names (:class:`ParamIndex`)."""
        first_fqn: dict[int, str] = {}
        tied: dict[int, list[str]] = {}
        for _, _, _, fqn, name, param, stand_in in self._params():
            canonical = fqn + name
            _add_param(first_fqn, tied, id(param), canonical)
            if stand_in is not None and stand_in is not param:  # FSDP1: its full-shape stand-in too
                _add_param(first_fqn, tied, id(stand_in), canonical)
        return ParamIndex(first_fqn, {f: tuple(fqns) for fqns in tied.values() for f in fqns}, self)

    def _attr_names(self) -> dict[str, str]:
        """Parameter name as ``model.named_parameters()`` spells it -> canonical FQN."""
        attr_to_fqn: dict[str, str] = {}
        for _, attr, _, fqn, name, _, _ in self._params():
            attr_to_fqn.setdefault(attr + name, fqn + name)
        return attr_to_fqn


def _has_extra_state(module: nn.Module) -> bool:
    """Whether ``module``'s class gives extra state (looked up on every call,
    as ``nn.Module.state_dict`` does: a class may be given
    ``get_extra_state`` after its first use)."""
    return getattr(type(module), "get_extra_state", nn.Module.get_extra_state) is not nn.Module.get_extra_state


def _add_param(first_fqn: dict[int, str], tied: dict[int, list[str]], key: int, fqn: str) -> None:
    first = first_fqn.setdefault(key, fqn)
    if first is not fqn:
        tied.setdefault(key, [first]).append(fqn)
