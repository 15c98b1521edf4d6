"""Adapters: the only code that reads or writes ``nn.Module`` and ``Optimizer`` objects.

Where each step lives:

- the entry points: :mod:`.module` (``get/set_model_state_dict``),
  :mod:`.optimizer` (``get/set_optimizer_state_dict``), :mod:`.state_dict`
  (``get/set_state_dict``); what they share: :mod:`._common`;
- the one walk over a model: :mod:`.walk`, which builds the
  :class:`~sdtree.adapters.index.ModelIndex` of :mod:`.index` and picks its
  :class:`~sdtree.adapters.index.StateDictIO`: :mod:`.plain` or :mod:`.fsdp1`;
- an optimizer's initial state (the shadow step): :mod:`.initial_state`;
- a load, step by step: :mod:`.load` (announce, plan, agree, bind, write),
  with the plans of :mod:`.model_plan` and :mod:`.optim_plan`.
"""

from sdtree.adapters.index import ModelIndex
from sdtree.adapters.module import get_model_state_dict, patch_model_state_dict, set_model_state_dict
from sdtree.adapters.optimizer import (
    get_optimizer_state_dict,
    patch_optimizer_state_dict,
    set_optimizer_state_dict,
)
from sdtree.adapters.state_dict import get_state_dict, set_state_dict
from sdtree.adapters.walk import index_model

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
