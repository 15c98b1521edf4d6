"""The layout of a combined checkpoint, and what each format can hold.

A *combined* checkpoint is ``{"model": model_state_dict, "optim":
optim_state_dict, ...}``; other entries (a scheduler, a step count) are
allowed and kept as they are. DCP directories and ``torch.save`` files hold
any such tree. A safetensors file, and a Hugging Face directory of them,
holds one flat ``{key: tensor}`` model state dict: a combined checkpoint goes
there as its ``"model"`` entry, and only when it holds nothing else (or with
``model_only=True``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Optional

from sdtree.checkpoint._formats import Format
from sdtree.errors import CheckpointFormatError, LayoutMismatchError, preview as _preview
from sdtree.types import is_flat_optim_state_dict, is_optim_state_dict
from sdtree.transforms.combined import MODEL, OPTIM, acts_on_combined, each, is_combined
from sdtree.transforms.compose import Transform

__all__ = ["MODEL", "OPTIM", "MODEL_ONLY_FORMATS", "is_combined", "apply_transform", "subtree", "keep_model", "fit_format"]

MODEL_ONLY_FORMATS: dict[Format, str] = {"safetensors": "a safetensors file", "hf": "a Hugging Face (hf) directory"}
"""The formats that hold a model state dict only, and how errors name them."""


def apply_transform(transform: Optional[Transform], tree: Any) -> Any:
    """Apply ``transform`` to a checkpoint's state dicts: on a combined
    checkpoint, to its model and each optimizer keyed by FQNs, together
    (:func:`sdtree.transforms.each`; an optimizer keyed by parameter ids has
    no FQNs to rename and is kept as it is, and so are other entries); any
    other tree whole. A transform that says itself where it applies in a
    combined checkpoint (``each(t)``, ``at("model", t)``, a pipeline with
    one) is applied to the whole tree, as written."""
    if transform is None:
        return tree
    if not is_combined(tree) or acts_on_combined(transform):
        return transform(tree)
    return each(transform)(tree)


def subtree(tree: Any, path: Optional[str], *, fn: str) -> Any:
    """The entry of ``tree`` at the dotted ``path`` (``"state_dict"``,
    ``"checkpoint.model"``); ``tree`` itself when ``path`` is None.

    Raises:
        LayoutMismatchError: no such entry (the message lists what is there).
    """
    if path is None:
        return tree
    node = tree
    walked: list[str] = []
    for part in path.split("."):
        if not isinstance(node, Mapping) or part not in node:
            where = "the checkpoint" if not walked else repr(".".join(walked))
            there = f"its entries are {_preview(node)}" if isinstance(node, Mapping) else f"it is a {type(node).__name__}"
            raise LayoutMismatchError(f"{fn}: key={path!r}: {where} has no entry {part!r} ({there}).")
        node = node[part]
        walked.append(part)
    return node


def keep_model(tree: Any) -> Any:
    """A combined checkpoint cut to its ``"model"`` entry; any other tree as it is."""
    return {MODEL: tree[MODEL]} if is_combined(tree) else tree


def fit_format(tree: Any, fmt: Format, *, fn: str) -> Any:
    """The tree to write in format ``fmt``: safetensors and hf get the model
    state dict of a combined checkpoint, and nothing that is not a model.

    Raises:
        CheckpointFormatError: safetensors or hf, and ``tree`` holds an
            optimizer or other entries besides the model.
    """
    holder = MODEL_ONLY_FORMATS.get(fmt)
    if holder is None:
        return tree
    if is_combined(tree):
        others = [k for k in tree if k != MODEL]
        if others:
            raise CheckpointFormatError(
                f"{fn}: {holder} holds a model state dict only, but the checkpoint also "
                f"holds {_preview(others)}. Pass model_only=True (--model-only) to write just its "
                f"{MODEL!r} entry, or write 'dcp' or 'torch', which hold optimizers too."
            )
        return tree[MODEL]
    if is_optim_state_dict(tree) or (isinstance(tree, Mapping) and is_flat_optim_state_dict(tree)):
        raise CheckpointFormatError(
            f"{fn}: {holder} holds a model state dict only, and this is an optimizer "
            "state dict. Write it as 'dcp' or 'torch'."
        )
    return tree
