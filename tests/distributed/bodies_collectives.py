"""Bodies for gather_into and the in-place, scattering broadcasts (issue 14)."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Shard, distribute_tensor

from sdtree.errors import StructureMismatchError
from sdtree.transforms.gather import gather_into
from tests.distributed.bodies_utils import _sharded, _sharded_tensor


def _gather_case(mesh, rank: int, seed: int):
    """Full tensors, their sharded state dict (small and bucket-filling
    tensors, even and uneven rows, DTensor layouts, a ShardedTensor)."""
    full, sharded = _sharded(mesh)
    g = torch.Generator().manual_seed(seed)
    big = {"big_even": torch.randn(64, 33, generator=g), "big_uneven": torch.randn(65, 7, generator=g)}
    rows = torch.randn(4, 3, generator=g)
    full = {**full, **big, "legacy": rows, "plain": torch.ones(2), "n": 3}
    sharded = {
        **sharded,
        **{k: distribute_tensor(v, mesh, [Shard(0)]) for k, v in big.items()},
        "legacy": _sharded_tensor(rank, rows),
        "plain": full["plain"],
        "n": 3,
    }
    return full, sharded


def gather_into_writes_the_destination(rank: int, world_size: int) -> list[str]:
    mesh = init_device_mesh("cpu", (world_size,))
    full, sharded = _gather_case(mesh, rank, 0)
    dest = {k: (torch.full_like(v, -1.0) if isinstance(v, torch.Tensor) else v) for k, v in full.items()}
    dest["cols"] = torch.empty(5, 2).t()  # not contiguous: gathered, then copied
    dest["even"] = torch.empty(3, 4).t()  # in a bucket, not contiguous
    dest["big_even"] = torch.empty(33, 64).t()  # alone, not contiguous: through a staging buffer
    ptrs = {k: v.data_ptr() for k, v in dest.items() if isinstance(v, torch.Tensor)}
    for seed, bucket in ((0, 64), (1, 1 << 20), (2, 64)):  # again: the staging buffers are reused
        full, sharded = _gather_case(mesh, rank, seed)
        out = gather_into(sharded, dest, bucket_bytes=bucket)
        for key, value in sharded.items():
            if isinstance(value, (DTensor,)) or type(value).__name__ == "ShardedTensor":
                assert out[key] is dest[key], key
                assert torch.equal(dest[key], full[key]), (key, seed, bucket)
            else:
                assert out[key] is value, key
        assert dest["plain"].data_ptr() == ptrs["plain"] and torch.equal(dest["plain"], torch.full((2,), -1.0))
        assert {k: v.data_ptr() for k, v in dest.items() if isinstance(v, torch.Tensor)} == ptrs
    return sorted(out)


def gather_into_checks_on_every_rank(rank: int, world_size: int) -> list[str]:
    """A bad destination on one rank raises on both, naming the key; nothing written."""
    mesh = init_device_mesh("cpu", (world_size,))
    full, sharded = _sharded(mesh)
    messages = []
    for bad in ({"uneven": torch.zeros(4, 3)}, {"even": torch.zeros(4, 3, dtype=torch.float64)}, {"ints": None}):
        dest = {k: torch.zeros_like(v) for k, v in full.items()}
        if rank == 1:
            dest.update(bad)
        try:
            gather_into(sharded, dest)
        except StructureMismatchError as err:
            messages.append(str(err))
            assert all(not v.any() for v in dest.values() if isinstance(v, torch.Tensor))
        else:
            raise AssertionError("no error")
    try:
        gather_into(sharded, {"even": torch.zeros(4, 3)})
    except StructureMismatchError as err:
        messages.append(str(err))
    dist.barrier()
    return messages


