"""The one load flow of ``set_model_state_dict``, ``set_optimizer_state_dict``
and ``set_state_dict``, one step after the other:

1. entry (:mod:`~sdtree.adapters.module`, :mod:`~sdtree.adapters.optimizer`,
   :mod:`~sdtree.adapters.state_dict`): the options read once into plain
   arguments, the model walked once (:func:`~sdtree.adapters.walk.index_model`),
   the deprecated module-keyed input re-keyed, torch's emptiness checks;
2. announce (:func:`~sdtree.transforms.broadcast.announce`), with
   ``broadcast_from_rank0``: rank 0's model and optimizer state dicts in one
   metadata broadcast; every rank plans on their placeholders;
3. plan (:mod:`~sdtree.adapters.model_plan`, :mod:`~sdtree.adapters.optim_plan`):
   normalize, check everything, write nothing: a :class:`LoadPlan`;
4. agree (:func:`agree`): every rank the same outcome, when the load is collective;
5. bind: the tensors (the given ones, or those the broadcast delivers:
   straight into the model's own tensors where they fit, as each rank's
   shard where the model is sharded: FSDP2's layout scattered, each rank
   receiving only its rows) into the plan's writes, no re-planning;
6. write (the model's :class:`~sdtree.adapters.index.StateDictIO`):
   optimizers first, then the model, so that a failing optimizer write
   leaves the model as it was.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Optional, TypeVar

import attrs
import torch
from torch import nn
from torch.nn.modules.module import _IncompatibleKeys

from sdtree import _collectives
from sdtree.adapters.index import ModelIndex, ModelWrite, OptimWrite
from sdtree.adapters.model_plan import ModelPlan, plan_model_load
from sdtree.adapters.optim_plan import OptimizersPlan, plan_optimizers_load
from sdtree.errors import IncompatibleStateDictError, SdtreeError, api_name
from sdtree.options import StateDictOptions
from sdtree.state_dict_utils import deliver_into
from sdtree.transforms.broadcast import announce
from sdtree.transforms.tensors import is_dtensor
from sdtree.types import PARAMS, StateDict

__all__ = ["LoadPlan", "load", "agree"]

T = TypeVar("T")
Place = Callable[[tuple[Any, ...], Any], Any]


@attrs.frozen(eq=False)
class LoadPlan:
    """A validated load: the model's plan and the optimizers' (``None`` for
    a part not loaded), made on the given state dicts or on a broadcast's
    placeholders."""

    model: Optional[ModelPlan]
    optims: Optional[OptimizersPlan]

    def bind(
        self, model_sd: Any, optim_sd: Any, written: Optional[Mapping[str, torch.Tensor]] = None
    ) -> tuple[Optional[ModelWrite], list[OptimWrite]]:
        """The writes, with the values of the state dicts the plan was made on
        (or of the delivered ones, of their structure)."""
        model = self.model.bind(model_sd, written) if self.model is not None else None
        return model, self.optims.bind(optim_sd) if self.optims is not None else []

    def placer(self, prefixed: bool) -> Optional[Place]:
        """Where each tensor of a broadcast lands as it arrives: this rank's
        shard of what is sharded (``None`` when nothing is). ``prefixed``: the
        paths start with the part (0: model, 1: optimizers)."""
        return _routed([part.placer() if part is not None else None for part in (self.model, self.optims)], prefixed)

    def shards(self, prefixed: bool) -> Optional[Callable[[tuple[Any, ...]], Any]]:
        """The DTensor each tensor of a broadcast is sharded as (``None`` when
        nothing is): FSDP2's layouts are scattered, each rank receiving its rows."""
        return _routed([part.templates() if part is not None else None for part in (self.model, self.optims)], prefixed)


F = TypeVar("F", bound=Callable[..., Any])


def _routed(parts: list[Optional[F]], prefixed: bool) -> Optional[F]:
    """One function of a path (and more) from the model's and the
    optimizers' (``None``: that part needs none): the paths start with the
    part (0: model, 1: optimizers) when ``prefixed``, and what a part lacks
    gets ``None``, or its tensor back (a placer)."""
    if not any(parts):
        return None
    if not prefixed:
        return next(p for p in parts if p is not None)

    def routed(path: tuple[Any, ...], *rest: Any) -> Any:
        part = parts[path[0]]
        if part is not None:
            return part(path[1:], *rest)
        return rest[0] if rest else None

    return routed  # type: ignore[return-value]  # the parts' signature, routed by the path's head


def agree(needed: bool, plan: Callable[[], T]) -> T:
    """Run ``plan`` (every check, no write) and, when ``needed`` (the model is
    sharded or the load broadcasts), make every rank agree on the outcome with
    one small collective: if any rank's input is bad, every rank raises the
    same error, naming each bad rank and its problems, and none writes.

    Collective when ``needed`` and a process group is up: call on every rank.
    """
    if not needed:
        return plan()
    fn = api_name()

    def fail(bad: list[tuple[int, str]], world: int) -> Exception:
        ranks = ", ".join(str(rank) for rank, _ in bad)
        details = " | ".join(f"rank {rank}: {text}" for rank, text in bad)
        return IncompatibleStateDictError(
            f"{fn}: rank(s) {ranks} of {world} cannot load; nothing was written on any rank. {details}"
        )

    return _collectives.agree(
        plan, catch=(SdtreeError, ValueError, TypeError), report=lambda err: f"{type(err).__name__}: {err}", fail=fail
    )


def load(
    model: nn.Module,
    index: ModelIndex,
    optims: tuple[torch.optim.Optimizer, ...],
    model_sd: Optional[StateDict],
    optim_sd: Optional[StateDict],
    options: StateDictOptions,
) -> _IncompatibleKeys:
    """Load ``model_sd`` (canonical FQNs) into ``model`` and ``optim_sd`` into
    ``optims`` (``None``: that part is not loaded; an empty model state dict
    loads nothing into the model), checked before anything is written.

    The options the load needs are read here, once, into plain arguments:
    ``strict``, ``ignore_frozen_params`` (the plans take them) and
    ``broadcast_from_rank0``: rank 0's state dicts are loaded on every rank
    (the other ranks' inputs are ignored), received straight into the
    model's own tensors where they fit when only the model is loaded.

    Collective with ``broadcast_from_rank0``, for a sharded or FSDP1 model,
    or for optimizers of sharded parameters: call on every rank.
    """
    strict, ignore_frozen, broadcast = options.strict, options.ignore_frozen_params, options.broadcast_from_rank0
    parts = [sd for sd in (model_sd, optim_sd) if sd is not None]
    announced = None
    if broadcast:
        announced = announce(*parts)
        placeholders = announced.placeholders()
        planned = list(placeholders) if len(parts) > 1 else [placeholders]
        for placeholder in planned:
            if not placeholder:
                raise IncompatibleStateDictError(
                    f"{api_name()}: broadcast_from_rank0=True but rank 0 passed an empty state dict. "
                    "Rank 0 passes the full state dict; the other ranks pass {}."
                )
        model_in = planned.pop(0) if model_sd is not None else None
        optim_in = planned.pop(0) if optim_sd is not None else None
    else:
        model_in, optim_in = model_sd, optim_sd

    def plan() -> LoadPlan:
        return LoadPlan(
            plan_model_load(index, model_in, strict=strict, ignore_frozen=ignore_frozen) if model_in else None,
            plan_optimizers_load(index, optims, optim_in, strict=strict) if optim_in is not None else None,
        )

    needed = (
        broadcast
        or (model_sd is not None and index.distributed)
        or (optim_sd is not None and (index.io.collective or _sharded(optims)))
    )
    if announced is None:
        model_write, optim_writes = agree(needed, lambda: plan().bind(model_in, optim_in))
    else:
        load_plan = agree(needed, plan)
        # the ranks have agreed: now the tensors move
        targets = load_plan.model.destinations() if load_plan.model is not None and optim_sd is None else {}
        prefixed = len(parts) > 1
        place, shards = load_plan.placer(prefixed), load_plan.shards(prefixed)
        if targets:
            into = lambda path: targets.get(path[0]) if len(path) == 1 else None  # noqa: E731
            delivered = deliver_into(announced, place=place, shards=shards, into=into)
        else:
            delivered = announced.deliver(place=place, shards=shards)
        delivered = list(delivered) if len(parts) > 1 else [delivered]
        model_out = delivered.pop(0) if model_sd is not None else None
        optim_out = delivered.pop(0) if optim_sd is not None else None
        model_write, optim_writes = load_plan.bind(model_out, optim_out, written=targets)
    io = index.io
    for optim, write in zip(optims, optim_writes):
        io.write_optimizer(model, optim, index, write)
    if model_write is None:
        return _IncompatibleKeys([], [])
    io.write_model(model, index, model_write)
    return _IncompatibleKeys(model_write.missing, model_write.unexpected)


def _sharded(optims: tuple[torch.optim.Optimizer, ...]) -> bool:
    """Whether any optimizer holds a DTensor parameter (every rank must load)."""
    return any(is_dtensor(p) for optim in optims for group in optim.param_groups for p in group[PARAMS])
