"""Collective transforms: functions from state dict to state dict that every
rank of a process group calls in the same order, by concept:

- :mod:`sdtree.transforms.gather`: ``gather_dtensors`` (full tensors, in
  buckets), ``gather_into`` (into tensors you hold; ``GatherPlan`` plans it
  once for a destination gathered into again) and ``keep_on_ranks``;
- :mod:`sdtree.transforms.broadcast`: ``broadcast_from_rank0``, and its two
  halves ``announce`` (metadata) and ``Announcement.deliver`` (tensors);
- :mod:`sdtree.transforms.sharding`: ``shard_like`` / ``shard_as`` /
  ``local_slice``, this rank's part of a full tensor (not collective).

This module gathers them under one name. A transform validates its input
before its first collective, because a raise on one rank is a hang on the
others. The utilities with torch's signatures that write into their
arguments are in :mod:`sdtree.state_dict_utils`.
"""

from __future__ import annotations

from sdtree._collectives import DEFAULT_BUCKET_BYTES
from sdtree.transforms.broadcast import Announcement, announce, broadcast_from_rank0
from sdtree.transforms.gather import GatherPlan, gather_dtensors, gather_into, gather_state_dict, keep_on_ranks
from sdtree.transforms.sharding import local_slice, shard_as, shard_like

__all__ = [
    "keep_on_ranks",
    "gather_dtensors",
    "gather_into",
    "GatherPlan",
    "broadcast_from_rank0",
    "announce",
    "Announcement",
    "shard_like",
    "shard_as",
    "local_slice",
    "gather_state_dict",
    "DEFAULT_BUCKET_BYTES",
]
