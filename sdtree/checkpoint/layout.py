"""The layout of a combined checkpoint, and what each format can hold.

A *combined* checkpoint is ``{"model": model_state_dict, "optim":
optim_state_dict, ...}``; other entries (a scheduler, a step count) are
allowed and kept as they are. DCP directories and ``torch.save`` files hold
any such tree. A safetensors file holds one flat ``{key: tensor}`` model state
dict: a combined checkpoint goes there as its ``"model"`` entry, and only
when it holds nothing else (or with ``model_only=True``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Optional

from sdtree.checkpoint._formats import Format
from sdtree.errors import CheckpointFormatError, preview as _preview
from sdtree.types import PARAMS, PG, STATE, is_flat_optim_state_dict, is_optim_state_dict
from sdtree.transforms.compose import Transform

__all__ = ["MODEL", "OPTIM", "is_combined", "apply_transform", "keep_model", "fit_format"]

MODEL = "model"
OPTIM = "optim"


def is_combined(tree: Any) -> bool:
    """Whether ``tree`` is ``{"model": {...}, ...}``."""
    return isinstance(tree, Mapping) and isinstance(tree.get(MODEL), Mapping)


def _keyed_by_fqns(optim: Any) -> bool:
    """Whether an optimizer state dict names its parameters (FQNs), not ids."""
    if not is_optim_state_dict(optim):
        return isinstance(optim, Mapping)
    keys = list(optim[STATE]) + [k for group in optim[PG] for k in group.get(PARAMS, ())]
    return all(type(k) is str for k in keys)


def _is_optimizer(value: Any) -> bool:
    """Whether ``value`` is an optimizer state dict, nested or flat."""
    return is_optim_state_dict(value) or (isinstance(value, Mapping) and is_flat_optim_state_dict(value))


def apply_transform(transform: Optional[Transform], tree: Any) -> Any:
    """Apply ``transform`` to a checkpoint's state dicts.

    On a combined checkpoint it maps the ``"model"`` entry, the ``"optim"``
    entry, and every other top-level entry that is an optimizer state dict
    (trainers name it ``"optimizer"``, too), so that the optimizer's FQNs
    follow the model's; an optimizer keyed by parameter ids has no FQNs to
    rename and is kept as it is, and so are other entries. Any other tree is
    mapped whole.
    """
    if transform is None:
        return tree
    if not is_combined(tree):
        return transform(tree)
    out = dict(tree)
    out[MODEL] = transform(tree[MODEL])
    for key, value in tree.items():
        if key != MODEL and (key == OPTIM or _is_optimizer(value)) and _keyed_by_fqns(value):
            out[key] = transform(value)
    return out


def keep_model(tree: Any) -> Any:
    """A combined checkpoint cut to its ``"model"`` entry; any other tree as it is."""
    return {MODEL: tree[MODEL]} if is_combined(tree) else tree


def fit_format(tree: Any, fmt: Format, *, fn: str) -> Any:
    """The tree to write in format ``fmt``: a safetensors file gets the model
    state dict of a combined checkpoint, and nothing that is not a model.

    Raises:
        CheckpointFormatError: safetensors, and ``tree`` holds an optimizer or
            other entries besides the model.
    """
    if fmt != "safetensors":
        return tree
    if is_combined(tree):
        others = [k for k in tree if k != MODEL]
        if others:
            raise CheckpointFormatError(
                f"{fn}: a safetensors file holds a model state dict only, but the checkpoint also "
                f"holds {_preview(others)}. Pass model_only=True (--model-only) to write just its "
                f"{MODEL!r} entry, or write 'dcp' or 'torch', which hold optimizers too."
            )
        return tree[MODEL]
    if is_optim_state_dict(tree) or (isinstance(tree, Mapping) and is_flat_optim_state_dict(tree)):
        raise CheckpointFormatError(
            f"{fn}: a safetensors file holds a model state dict only, and this is an optimizer "
            "state dict. Write it as 'dcp' or 'torch'."
        )
    return tree
