"""What every entry point of the adapters shares: pausing the garbage
collector and naming the function in its errors (:func:`public`), the
deprecations of ``submodules=``, torch's emptiness checks, and the last step
of every ``get_*`` (gather and/or offload)."""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable, Iterable
from typing import Any, Optional, TypeVar

import torch

from sdtree._collectives import is_distributed
from sdtree._gc import paused_gc
from sdtree.errors import api_call
from sdtree.options import StateDictOptions
from sdtree.transforms import Transform, identity, offload_to_cpu
from sdtree.transforms.gather import gather_dtensors, keep_on_ranks

__all__ = ["public", "as_optimizers", "warn_submodules", "finish", "check_model_not_empty", "check_optim_not_empty"]

T = TypeVar("T")


def public(fn: Callable[..., T]) -> Callable[..., T]:
    """Make ``fn`` a public entry point: errors raised inside name it
    (:func:`~sdtree.errors.api_call`), and the cyclic garbage collector is
    paused while it runs (:func:`~sdtree._gc.paused_gc`)."""

    @paused_gc
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> T:
        with api_call(fn.__name__):
            return fn(*args, **kwargs)

    return wrapper


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


def finish(*, full: bool, cpu_offload: bool) -> Transform:
    """The last step of every ``get_*``: gather and/or offload."""
    if full:
        t = gather_dtensors(cpu_offload=cpu_offload)
        if cpu_offload:
            t = t >> offload_to_cpu(bulk=False)  # tensors that were never sharded
            if is_distributed():
                t = t >> keep_on_ranks((0,))
        return t
    if cpu_offload:
        return offload_to_cpu(bulk=False)
    return identity()


def check_model_not_empty(state_dict: Any, options: StateDictOptions, *, loading: bool) -> None:
    """torch's ``_verify_state_dict`` for a model state dict."""
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
    """torch's ``_verify_state_dict`` for an optimizer state dict."""
    if not state_dict and not (options.cpu_offload and options.full_state_dict) and not options.broadcast_from_rank0:
        raise RuntimeError(
            "The option indicates that model state_dict is required to save, "
            "or load but optim state_dict is empty."
        )
