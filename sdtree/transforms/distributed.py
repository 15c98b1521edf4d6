"""Collective transforms: functions from state dict to state dict that every
rank of a process group calls in the same order.

Collective: call on every rank. A transform validates its input before its
first collective, because a raise on one rank is a hang on the others.
"""

from __future__ import annotations

from typing import Any, Optional

import attrs

import torch.distributed as dist

from sdtree._tree import tree_map
from sdtree.transforms.compose import Transform

__all__ = ["keep_on_ranks", "gather_dtensors"]


def _rank(group: Optional[dist.ProcessGroup]) -> int:
    return dist.get_rank(group) if dist.is_available() and dist.is_initialized() else 0


@attrs.frozen(repr=False)
class _KeepOnRanks(Transform):
    _factory = "keep_on_ranks"
    ranks: tuple[int, ...]
    group: Optional[Any] = attrs.field(default=None, eq=False)

    def __call__(self, state_dict: Any, /) -> Any:
        if _rank(self.group) in self.ranks:
            return state_dict
        return {}


def keep_on_ranks(ranks: tuple[int, ...], *, group: Optional[dist.ProcessGroup] = None) -> Transform:
    """Return a transform that keeps the state dict on ``ranks`` (of ``group``)
    and gives ``{}`` elsewhere. Outside a process group, this process is rank 0.

    Not a collective: it only reads the rank.
    """
    return _KeepOnRanks(tuple(ranks), group)


def _full(value: Any) -> Any:
    from torch.distributed.tensor import DTensor

    if isinstance(value, DTensor):
        return value.full_tensor()
    return value


@attrs.frozen(repr=False)
class _GatherDTensors(Transform):
    _factory = "gather_dtensors"

    def __call__(self, state_dict: Any, /) -> Any:
        return tree_map(_full, state_dict)


def gather_dtensors() -> Transform:
    """Return a transform that replaces every DTensor by its full tensor.

    Collective: call on every rank (each DTensor is gathered over its mesh).
    """
    return _GatherDTensors()


