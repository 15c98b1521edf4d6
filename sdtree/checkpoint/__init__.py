"""Checkpoint files: save, load, inspect, compare and convert state dicts on disk.

Three formats, told apart by :func:`detect_format`:

- ``"dcp"``: a ``torch.distributed.checkpoint`` directory (``.metadata`` and
  ``*.distcp`` shards). Saved collectively and sharded from several ranks,
  or from one process; loads at any world size.
- ``"torch"``: a ``torch.save`` file; it loads with ``torch.load(weights_only=True)``.
- ``"safetensors"``: one flat ``{key: tensor}`` *model* state dict; tied
  tensors are stored once and restored as one object (metadata ``"sdtree.aliases"``).

A combined checkpoint is ``{"model": model_state_dict, "optim":
optim_state_dict, ...}`` (more entries, such as a scheduler, are kept);
DCP and ``torch.save`` hold it whole, safetensors only its ``"model"``.

Checkpoints come from strangers: nothing is unpickled beyond
``torch.load(weights_only=True)`` (and DCP's own metadata classes) unless
``trust_pickle=True``; every size and offset is checked against the files
before anything is allocated for it, and no file outside a DCP directory is
read. Nothing is left half-written: output goes to a temporary name beside
the destination and is renamed at the end, and an existing destination is
replaced only with ``force=True``.

:func:`convert` streams: it opens the source's index, applies a transform to
a tree of placeholder (meta) tensors, then reads and writes one tensor at a
time, so memory stays near the largest tensor.
"""

from sdtree.checkpoint._api import Conversion, PlannedTensor, Progress, convert, load, open_checkpoint, save
from sdtree.checkpoint._formats import FORMATS, Format, destination_format, detect_format
from sdtree.checkpoint._inspect import (
    CheckpointDiff,
    Difference,
    ParamGroupInfo,
    Summary,
    TensorInfo,
    describe,
    diff,
)
from sdtree.checkpoint._lazy import Checkpoint

__all__ = [
    "Format",
    "FORMATS",
    "detect_format",
    "destination_format",
    "save",
    "load",
    "open_checkpoint",
    "Checkpoint",
    "convert",
    "Conversion",
    "PlannedTensor",
    "Progress",
    "describe",
    "Summary",
    "TensorInfo",
    "ParamGroupInfo",
    "diff",
    "CheckpointDiff",
    "Difference",
]
