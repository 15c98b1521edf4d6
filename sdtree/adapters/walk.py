"""The one walk over a model: :func:`index_model` builds its
:class:`~sdtree.adapters.index.ModelIndex`.

Every ``get_*`` and ``set_*`` call walks the model once, here, and reads
everything else off the index. The walk records every module path with its
attribute, state-dict key and canonical FQN prefixes: wrapper segments are
removed from FQNs at any depth and in any nesting order (DDP's ``module.``,
``torch.compile``'s ``_orig_mod.``, activation checkpointing's
``_checkpoint_wrapped_module.``, FSDP's ``_fsdp_wrapped_module.``, and the
hidden children a module names in its ``_fqn_modifiers()``, the
``dsd_fqn_modifiers`` option). It also chooses how the model's state is read
and written (:class:`~sdtree.adapters.index.StateDictIO`): FSDP1's part of
the walk, its flat parameters and their full-shape stand-ins, is
:class:`sdtree.adapters.fsdp1.FlatParameters`.

The walk is linear in the number of modules, reads the model without
changing it, and is built per call: nothing caches a model.
"""

from __future__ import annotations

import sys

from torch import nn

from sdtree.adapters import fsdp1
from sdtree.adapters.index import ModelIndex, ModulePath
from sdtree.adapters.plain import PLAIN

__all__ = ["index_model"]

_AC_CHILD = "_checkpoint_wrapped_module"


def _hidden_children(module: nn.Module, modifiers: str, flat: fsdp1.FlatParameters) -> tuple[set[str], set[str]]:
    """Return (children dropped from FQNs, children dropped from state-dict keys)."""
    hidden: set[str] = set()
    unkeyed: set[str] = set()
    ddp = sys.modules.get("torch.nn.parallel.distributed")
    if ddp is not None and isinstance(module, ddp.DistributedDataParallel):
        hidden.add("module")
    dynamo = sys.modules.get("torch._dynamo.eval_frame")
    if dynamo is not None and isinstance(module, dynamo.OptimizedModule):
        hidden.add("_orig_mod")
    ac = sys.modules.get("torch.distributed.algorithms._checkpoint.checkpoint_wrapper")
    if ac is not None and isinstance(module, ac.ActivationWrapper):
        hidden.add(_AC_CHILD)
        unkeyed.add(_AC_CHILD)
    if fsdp1.is_fsdp1(module):
        flat.visit(module)
        hidden.add(fsdp1.WRAPPED_CHILD)  # FSDP1's own state-dict hooks drop it from keys too
        unkeyed.add(fsdp1.WRAPPED_CHILD)
    modifier = getattr(module, modifiers, None)
    if modifier is not None and callable(modifier):
        hidden.update(modifier().values())
    return hidden, unkeyed


def index_model(model: nn.Module, dsd_fqn_modifiers: str = "_fqn_modifiers") -> ModelIndex:
    """Walk ``model`` once and return its :class:`ModelIndex`: every module
    path in ``state_dict()`` order (preorder, registration order), with its
    attribute, state-dict key and FQN prefixes."""
    paths: list[ModulePath] = []
    flat = fsdp1.FlatParameters()  # FSDP1's part of the walk
    stack: list[ModulePath] = [(model, "", "", "")]
    while stack:
        path = stack.pop()
        paths.append(path)
        module, attr, key, fqn = path
        if not module._modules:
            continue
        hidden, unkeyed = _hidden_children(module, dsd_fqn_modifiers, flat)
        for name, child in reversed(module._modules.items()):
            if child is None:
                continue
            stack.append(
                (
                    child,
                    f"{attr}{name}.",
                    key if name in unkeyed else f"{key}{name}.",
                    fqn if name in hidden else f"{fqn}{name}.",
                )
            )
    return ModelIndex(paths=tuple(paths), io=fsdp1.FSDP1IO(flat) if flat else PLAIN)
