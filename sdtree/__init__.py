"""sdtree: PyTorch state dicts as immutable pytrees moved by small, composable transforms."""

from sdtree import errors, recipes, transforms
from sdtree.adapters import (
    get_model_state_dict,
    get_optimizer_state_dict,
    get_state_dict,
    patch_model_state_dict,
    patch_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
    set_state_dict,
)
from sdtree.options import StateDictOptions
from sdtree.transforms import Transform, pipeline
from sdtree.staging import Stager
from sdtree.state_dict_utils import broadcast_state_dict, copy_state_dict, distribute_state_dict, distribute_tensors
from sdtree.transforms.gather import gather_state_dict
from sdtree.transforms.nested import flatten_state_dict, unflatten_state_dict
from sdtree.transforms.tensors import check_state_dict_similarity, create_cpu_state_dict, offload_state_dict_to_cpu

__version__ = "0.1.0"

__all__ = [
    "StateDictOptions",
    "get_model_state_dict",
    "get_optimizer_state_dict",
    "get_state_dict",
    "set_model_state_dict",
    "set_optimizer_state_dict",
    "set_state_dict",
    "patch_model_state_dict",
    "patch_optimizer_state_dict",
    "errors",
    "recipes",
    "transforms",
    "Transform",
    "pipeline",
    "flatten_state_dict",
    "unflatten_state_dict",
    "create_cpu_state_dict",
    "copy_state_dict",
    "check_state_dict_similarity",
    "offload_state_dict_to_cpu",
    "gather_state_dict",
    "broadcast_state_dict",
    "distribute_state_dict",
    "distribute_tensors",
    "Stager",
]
