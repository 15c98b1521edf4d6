"""What the module and optimizer adapters share: option handling, the
deprecation of ``submodules=``, the last full/offload step, and the checks
torch's ``_verify_state_dict`` makes."""

from __future__ import annotations

import functools
import gc
import warnings
from collections.abc import Callable, Iterable
from typing import Any, Optional, TypeVar

import torch

from sdtree import _collectives
from sdtree._collectives import is_distributed
from sdtree.errors import IncompatibleStateDictError, SdtreeError
from sdtree.options import StateDictOptions
from sdtree.transforms import Transform, identity, offload_to_cpu
from sdtree.transforms.broadcast import Announcement, announce
from sdtree.transforms.gather import gather_dtensors, keep_on_ranks

T = TypeVar("T")


def as_optimizers(optimizers: Any) -> tuple[torch.optim.Optimizer, ...]:
    if isinstance(optimizers, torch.optim.Optimizer):
        return (optimizers,)
    return tuple(optimizers)


def warn_submodules(submodules: Optional[Iterable[Any]]) -> None:
    if submodules:
        warnings.warn(
            "Getting submodules only model/optim state_dict is deprecated and "
            "will be removed in 2.5. This feature can be achieved by manually "
            "filtering out the state_dict returned from get_state_dict.",
            FutureWarning,
            stacklevel=3,
        )


def finish(options: StateDictOptions) -> Transform:
    """The last step of every ``get_*``: gather and/or offload, as the options say."""
    if options.full_state_dict:
        t = gather_dtensors(cpu_offload=options.cpu_offload)
        if options.cpu_offload:
            t = t >> offload_to_cpu(bulk=False)  # tensors that were never sharded
            if is_distributed():
                t = t >> keep_on_ranks((0,))
        return t
    if options.cpu_offload:
        return offload_to_cpu(bulk=False)
    return identity()


def check_model_not_empty(state_dict: Any, options: StateDictOptions, *, loading: bool) -> None:
    if (
        not state_dict
        and not options.ignore_frozen_params
        and not (options.cpu_offload and options.full_state_dict)
        and options.strict
        and not options.broadcast_from_rank0
    ):
        raise RuntimeError(
            "The option indicates that model state_dict is required to save "
            f"or load, but model state_dict is empty. ({'loading' if loading else 'saving'}; "
            "pass StateDictOptions(strict=False) to allow an empty model state dict.)"
        )


def check_optim_not_empty(state_dict: Any, options: StateDictOptions) -> None:
    if not state_dict and not (options.cpu_offload and options.full_state_dict) and not options.broadcast_from_rank0:
        raise RuntimeError(
            "The option indicates that model state_dict is required to save, "
            "or load but optim state_dict is empty."
        )


def without_gc(fn: Callable[..., T]) -> Callable[..., T]:
    """Run ``fn`` with the cyclic garbage collector paused (as torch's DSD does):
    the many small objects of a state dict otherwise trigger full collections
    that walk every live tensor."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> T:
        enabled = gc.isenabled()
        gc.disable()
        try:
            return fn(*args, **kwargs)
        finally:
            if enabled:
                gc.enable()

    return wrapper


def announce_load(state_dict: Any, options: StateDictOptions, fn: str) -> tuple[Any, Optional[Announcement]]:
    """With ``broadcast_from_rank0``: announce rank 0's state dict to every
    rank (structure, shapes and dtypes; no tensor data) and return its
    placeholders (meta tensors) with the announcement. The load is planned
    and agreed on the placeholders; then :meth:`Announcement.deliver` moves
    the tensors. Without the option: ``(state_dict, None)``.

    Collective when the option is set: call on every rank.
    """
    if not options.broadcast_from_rank0:
        return state_dict, None
    announced = announce(state_dict)
    placeholders = announced.placeholders()
    if not placeholders:
        raise IncompatibleStateDictError(
            f"{fn}: broadcast_from_rank0=True but rank 0 passed an empty state dict. "
            "Rank 0 passes the full state dict; the other ranks pass {}."
        )
    return placeholders, announced


def agree(fn: str, needed: bool, plan: Callable[[], T]) -> T:
    """Run ``plan`` (every check, no write) and, when ``needed`` (the model is
    sharded or the load broadcasts), make every rank agree on the outcome with
    one small collective: if any rank's input is bad, every rank raises the
    same error, naming each bad rank and its problems, and none writes.

    Collective when ``needed`` and a process group is up: call on every rank.
    """
    if not needed:
        return plan()

    def fail(bad: list[tuple[int, str]], world: int) -> Exception:
        ranks = ", ".join(str(rank) for rank, _ in bad)
        details = " | ".join(f"rank {rank}: {text}" for rank, text in bad)
        return IncompatibleStateDictError(
            f"{fn}: rank(s) {ranks} of {world} cannot load; nothing was written on any rank. {details}"
        )

    return _collectives.agree(
        plan, catch=(SdtreeError, ValueError, TypeError), report=lambda err: f"{type(err).__name__}: {err}", fail=fail
    )
