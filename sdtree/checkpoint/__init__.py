"""Checkpoint files: save, load, inspect, compare and convert state dicts on disk.

Four formats, told apart by :func:`detect_format`:

- ``"dcp"``: a ``torch.distributed.checkpoint`` directory (``.metadata`` and
  ``*.distcp`` shards). Saved collectively and sharded from several ranks,
  or from one process; loads at any world size.
- ``"torch"``: a ``torch.save`` file; it loads with ``torch.load(weights_only=True)``.
- ``"safetensors"``: one flat ``{key: tensor}`` *model* state dict; tied
  tensors are stored once and restored as one object (metadata ``"sdtree.aliases"``).
- ``"hf"``: a Hugging Face directory, as ``save_pretrained`` writes it: a
  model state dict in safetensors shards of at most ``max_shard_size`` and
  ``model.safetensors.index.json`` (or one ``model.safetensors``); the older
  ``pytorch_model*.bin`` layout is read too. Tied tensors as in safetensors.

A combined checkpoint is ``{"model": model_state_dict, "optim":
optim_state_dict, ...}`` (more entries, such as a scheduler, are kept);
DCP and ``torch.save`` hold it whole, safetensors and hf only its ``"model"``.

Checkpoints come from strangers: nothing is unpickled beyond
``torch.load(weights_only=True)`` (and DCP's own metadata classes) unless
``trust_pickle=True``; every size and offset is checked against the files
before anything is allocated for it (a Hugging Face index against its
shards' headers too), and no file outside a DCP or Hugging Face directory is
read (a symlink the directory holds is followed).
Nothing is left half-written: output goes to a temporary name beside
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
from sdtree.checkpoint._lazy import Checkpoint, ShardInfo

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
    "ShardInfo",
    "ParamGroupInfo",
    "diff",
    "CheckpointDiff",
    "Difference",
]
