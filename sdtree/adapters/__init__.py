"""Adapters: the only code that reads or writes ``nn.Module`` and ``Optimizer`` objects."""

from sdtree.adapters.index import ModelIndex, index_model
from sdtree.adapters.module import get_model_state_dict, patch_model_state_dict, set_model_state_dict
from sdtree.adapters.optimizer import (
    get_optimizer_state_dict,
    patch_optimizer_state_dict,
    set_optimizer_state_dict,
)
from sdtree.adapters.state_dict import get_state_dict, set_state_dict

__all__ = [
    "ModelIndex",
    "index_model",
    "get_model_state_dict",
    "set_model_state_dict",
    "patch_model_state_dict",
    "get_optimizer_state_dict",
    "set_optimizer_state_dict",
    "patch_optimizer_state_dict",
    "get_state_dict",
    "set_state_dict",
]
