"""Bodies run on every rank of the gloo worker pool (``fn(rank, world_size, ...)``)."""

from __future__ import annotations

import os

import torch

from sdtree.checkpoint import load, save
from sdtree.errors import DestinationExistsError


def full_state() -> dict:
    """The unsharded checkpoint every rank holds a shard of."""
    return {
        "model": {"w": torch.arange(24.0).view(8, 3), "b": torch.arange(6.0).to(torch.bfloat16), "c": torch.arange(12).view(3, 4)},
        "optim": {"state": {"w": {"exp_avg": torch.full((8, 3), 0.5)}}, "param_groups": [{"params": ["w", "b"], "lr": 0.1}]},
        "step": 4,
    }


def _sharded(world_size: int, zeros: bool = False) -> dict:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (world_size,))

    def shard(t: torch.Tensor, dim: int = 0) -> torch.Tensor:
        return distribute_tensor(torch.zeros_like(t) if zeros else t, mesh, [Shard(dim)])

    full = full_state()
    return {
        "model": {k: shard(v, dim=1 if k == "c" else 0) for k, v in full["model"].items()},
        "optim": {"state": {"w": {"exp_avg": shard(full["optim"]["state"]["w"]["exp_avg"])}}, "param_groups": full["optim"]["param_groups"]},
        "step": 0 if zeros else full["step"],
    }


def sharded_save(rank: int, world_size: int, path: str) -> list[str]:
    """Save DTensor shards collectively; return the files written."""
    save(_sharded(world_size), path)
    return sorted(os.listdir(path))


def sharded_load(rank: int, world_size: int, path: str) -> dict:
    """Load into a DTensor template; return this rank's local shards."""
    loaded = load(path, template=_sharded(world_size, zeros=True))
    return {
        "w": loaded["model"]["w"].to_local(),
        "b": loaded["model"]["b"].to_local(),
        "c": loaded["model"]["c"].to_local(),
        "exp_avg": loaded["optim"]["state"]["w"]["exp_avg"].to_local(),
        "step": loaded["step"],
    }


def save_over_existing(rank: int, world_size: int, path: str) -> str:
    """Every rank must raise the same error when the destination exists."""
    try:
        save(_sharded(world_size), path)
    except DestinationExistsError as err:
        return str(err)
    return "no error"


def bad_input_on_rank_1(rank: int, world_size: int, path: str) -> str:
    """Rank 1 alone holds a key DCP cannot store: every rank must raise the same error."""
    from sdtree.errors import CheckpointFormatError

    state = _sharded(world_size)
    if rank == 1:
        state["extra"] = {0: torch.ones(1)}
    try:
        save(state, path)
    except CheckpointFormatError as err:
        return str(err)
    return "no error"
