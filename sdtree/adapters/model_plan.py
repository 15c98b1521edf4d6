"""Plan a model load: every check, no write.

:func:`plan_model_load` checks a canonical state dict against the model's
index (missing and unexpected keys, shapes, kinds of dtype, leaf types, tied
parameters filled from either FQN) and returns a :class:`ModelPlan`: where
each of the model's values comes from. Bound to the tensors
(:meth:`ModelPlan.bind`: the given ones, or those a broadcast delivered for
the placeholders the plan was made on), it gives the
:class:`~sdtree.adapters.index.ModelWrite` the model's IO writes; sharded
models get each rank's slice there.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping
from typing import Any, Optional

import attrs
import torch
from torch import nn

from sdtree.adapters.index import ModelIndex, ModelWrite
from sdtree.errors import IncompatibleStateDictError, api_name, preview
from sdtree.transforms.sharding import shard_as, shard_like
from sdtree.types import StateDict

__all__ = ["ModelPlan", "plan_model_load", "module_keyed_to_fqns", "sharded_placer"]


@attrs.frozen(eq=False)
class ModelPlan:
    """A validated model load.

    Attributes:
        index: the model's index.
        sources: canonical FQN -> the key of the state dict its value comes
            from (itself, or a tied parameter's other FQN), for every value
            to load.
        missing: the model's FQNs the state dict lacks.
        unexpected: the state dict's keys the model lacks.
    """

    index: ModelIndex
    sources: dict[str, str]
    missing: list[str]
    unexpected: list[str]

    def bind(self, state_dict: StateDict, written: Optional[Mapping[str, torch.Tensor]] = None) -> ModelWrite:
        """What to write, with the values of ``state_dict`` (the one the plan
        was made on, or one of its structure: the delivered tensors), less
        those ``written`` already (received straight into the model's tensors)."""
        written = written or {}
        values = {}
        for fqn, key in self.sources.items():
            value = state_dict[key]
            if key not in written or written[key] is not value:
                values[fqn] = value
        if self.index.sharded:  # full tensors into sharded parameters: keep each rank's slice
            values = shard_like(self.index.sharded)(values)
        return ModelWrite(values, self.missing, self.unexpected)

    def destinations(self) -> dict[str, torch.Tensor]:
        """The model's own tensors a broadcast may receive straight into, by key."""
        return self.index.io.destinations(self.index, self.sources)

    def templates(self) -> Optional[Callable[[tuple[Any, ...]], Any]]:
        """For a broadcast into a sharded model: the DTensor each path's
        tensor is sharded as (``None`` when nothing is sharded)."""
        templates = self.index.sharded
        if not templates:
            return None
        return lambda path: templates.get(path[0]) if len(path) == 1 else None

    def placer(self) -> Optional[Callable[[tuple[Any, ...], Any], Any]]:
        """For a broadcast into a sharded model: keep this rank's shard of each
        tensor as it arrives (``None`` when nothing is sharded)."""
        return sharded_placer(self.templates())


def sharded_placer(templates: Optional[Callable[[tuple[Any, ...]], Any]]) -> Optional[Callable[[tuple[Any, ...], Any], Any]]:
    """What keeps this rank's shard of each full tensor at a path ``templates``
    gives a DTensor of its shape for."""
    if templates is None:
        return None

    def place(path: tuple[Any, ...], tensor: Any) -> Any:
        template = templates(path)
        if template is not None and tensor.dim() > 0 and tensor.shape == template.shape:
            return shard_as(tensor, template)
        return tensor

    return place


def _kind(dtype: torch.dtype) -> str:
    if dtype == torch.bool:
        return "bool"
    if dtype.is_complex:
        return "complex"
    return "float" if dtype.is_floating_point else "int"


def _value_problem(target: torch.Tensor, value: Any) -> Optional[str]:
    """Why ``value`` cannot be copied into ``target`` (None when it can)."""
    if not isinstance(value, torch.Tensor):
        return f"expected a tensor, found {type(value).__name__}"
    if value.shape != target.shape:
        return f"expected shape {tuple(target.shape)}, found {tuple(value.shape)}"
    if value.dtype != target.dtype and _kind(value.dtype) != _kind(target.dtype):
        return f"expected dtype {target.dtype} (or another {_kind(target.dtype)} dtype), found {value.dtype}"
    return None


def plan_model_load(index: ModelIndex, state_dict: StateDict, *, strict: bool, ignore_frozen: bool) -> ModelPlan:
    """Check ``state_dict`` against the model; raise before anything is written.

    With ``ignore_frozen``, absent frozen parameters are reported as missing,
    as torch does, but not required.

    Raises:
        IncompatibleStateDictError (a RuntimeError): under ``strict``, a
            missing or unexpected key; always, a value of the wrong shape,
            kind of dtype, or type.
    """
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
    sources = {}
    for key, value in state_dict.items():
        target = entries.get(key)
        if target is None:
            continue
        if target.kind != "extra":
            problem = _value_problem(target.value, value)
            if problem:
                bad.append(f"{key!r}: {problem}")
                continue
        sources[key] = key
    for fqn in missing:  # fill tied parameters from their present alias
        if entries[fqn].kind == "param":
            for alias in params.aliases(fqn):
                if alias in sources:
                    sources[fqn] = alias
                    break
    missing = [fqn for fqn in missing if fqn not in sources]
    required = [fqn for fqn in missing if fqn not in index.frozen] if ignore_frozen else missing
    problems = []
    if strict and required:
        problems.append(f"Missing key(s) in state_dict: {preview(required)}")
    if strict and unexpected:
        problems.append(f"Unexpected key(s) in state_dict: {preview(unexpected)}")
    if bad:
        problems.append(f"{len(bad)} value(s) do not fit: {preview(bad, quote=False)}")
    if problems:
        hint = (
            " Pass options=StateDictOptions(strict=False) to load the keys that match and get "
            "the others back as missing_keys/unexpected_keys."
            if strict and (required or unexpected)
            else ""
        )
        raise IncompatibleStateDictError(
            f"{api_name()}: cannot load into {type(index.modules[0][2]).__name__}: "
            + "; ".join(problems).rstrip(".")
            + f". Nothing was written.{hint}"
        )
    return ModelPlan(index, sources, missing, unexpected)


def module_keyed_to_fqns(state_dict: Mapping[Any, Any], index: ModelIndex) -> StateDict:
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
                f"{api_name()}: {type(submodule).__name__} is a key of the state dict "
                "but not a submodule of the model. Key the state dict by FQNs instead."
            )
        out.update({prefix + key: value for key, value in sub_state_dict.items()})
    return out
