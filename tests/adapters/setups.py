"""Wrapped-model setups for the differential tests: name -> builder."""

from __future__ import annotations

import torch
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

from tests.adapters.models import make, make_optim


def _wrap(kind: str, model):
    if kind == "compile":
        return torch.compile(model, backend="eager")
    if kind == "ac":
        for i in range(len(model.blocks)):
            model.blocks[i] = checkpoint_wrapper(model.blocks[i])
        return model
    if kind == "ac_of_compile":
        for i in range(len(model.blocks)):
            model.blocks[i] = checkpoint_wrapper(torch.compile(model.blocks[i], backend="eager"))
        return model
    if kind == "compile_of_ac":
        for i in range(len(model.blocks)):
            model.blocks[i] = checkpoint_wrapper(model.blocks[i])
        return torch.compile(model, backend="eager")
    return model


SETUPS = ["plain", "compile", "ac", "ac_of_compile", "compile_of_ac", "tied", "frozen", "groups", "sgd", "adamw"]


def build(name: str, seed: int = 0):
    """Return (model, optimizer) for a setup; wrappers applied before the optimizer is built."""
    model, _ = make(
        seed=seed,
        tied=name == "tied",
        frozen=name == "frozen",
    )
    model = _wrap(name, model)
    kind = {"sgd": "sgd", "adamw": "adamw"}.get(name, "adam")
    return model, make_optim(model, kind, groups=name == "groups")
