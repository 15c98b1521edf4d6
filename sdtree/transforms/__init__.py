"""Pure transforms over state dicts: factories that return :class:`Transform` objects.

See :mod:`sdtree.transforms.compose` for what a transform promises.
"""

from sdtree.transforms.combined import at, each
from sdtree.transforms.compose import Transform, identity, pipeline
from sdtree.transforms.keys import (
    add_prefix,
    drop_keys,
    drop_meta_tensors,
    rename,
    select_keys,
    strip_prefix,
)
from sdtree.transforms.optim import (
    OptimizerLayout,
    flatten_optimizer,
    fqns_to_param_ids,
    merge_optimizers,
    optimizer_layout,
    param_ids_to_fqns,
    split_optimizer,
    unflatten_optimizer,
)
from sdtree.transforms.tensor_ops import (
    cast,
    fuse,
    map_tensors,
    permute_for_rope,
    reshape,
    split,
    stack,
    transpose,
    unpermute_for_rope,
    unstack,
)
from sdtree.transforms.tensors import offload_to_cpu, to_device

__all__ = [
    "Transform",
    "identity",
    "pipeline",
    "strip_prefix",
    "add_prefix",
    "rename",
    "select_keys",
    "drop_keys",
    "drop_meta_tensors",
    "offload_to_cpu",
    "to_device",
    "OptimizerLayout",
    "optimizer_layout",
    "param_ids_to_fqns",
    "fqns_to_param_ids",
    "flatten_optimizer",
    "unflatten_optimizer",
    "merge_optimizers",
    "split_optimizer",
    "fuse",
    "split",
    "stack",
    "unstack",
    "permute_for_rope",
    "unpermute_for_rope",
    "transpose",
    "reshape",
    "cast",
    "map_tensors",
    "at",
    "each",
]
