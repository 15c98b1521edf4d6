"""Bodies for the collective utilities, compared with torch's private ones."""

from __future__ import annotations

import copy

import torch
import torch.distributed as dist
from torch.distributed import _state_dict_utils as torch_utils
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor

import sdtree
from sdtree.testing import assert_state_dict_equal
from sdtree.transforms.distributed import gather_dtensors


def _full_tensors():
    g = torch.Generator().manual_seed(0)
    return {
        "even": torch.randn(4, 3, generator=g),
        "uneven": torch.randn(5, 3, generator=g),
        "short": torch.randn(1, generator=g),
        "empty_rows": torch.randn(0, 2, generator=g),
        "ints": torch.arange(7),
        "bf16": torch.randn(3, 2, generator=g).to(torch.bfloat16),
        "cols": torch.randn(2, 5, generator=g),
        "replicated": torch.randn(2, 2, generator=g),
        "scalar": torch.tensor(2.5),
    }


def _sharded(mesh):
    full = _full_tensors()
    out = {}
    for key, value in full.items():
        if key == "cols":
            out[key] = distribute_tensor(value, mesh, [Shard(1)])
        elif key == "replicated":
            out[key] = distribute_tensor(value, mesh, [Replicate()])
        elif key == "scalar":
            out[key] = value
        else:
            out[key] = distribute_tensor(value, mesh, [Shard(0)])
    return full, out


def gather_matches_torch(rank: int, world_size: int) -> list[str]:
    mesh = init_device_mesh("cpu", (world_size,))
    full, sharded = _sharded(mesh)
    sharded = {**sharded, "nested": {"x": sharded["uneven"], "n": 3}, "none": None}
    expected = {**full, "nested": {"x": full["uneven"], "n": 3}, "none": None}
    for bucket in (16, 1 << 20):
        assert_state_dict_equal(gather_dtensors(bucket_bytes=bucket)(sharded), expected)
    for kwargs in ({}, {"cpu_offload": True}, {"cpu_offload": True, "ranks_only": (1,)}):
        ours = sdtree.gather_state_dict(sharded, **kwargs)
        theirs = torch_utils._gather_state_dict(sharded, **kwargs)
        assert_state_dict_equal(ours, theirs)
        if kwargs.get("ranks_only") and rank != 1:
            assert ours == {}
    return sorted(sharded)


def distribute_matches_torch(rank: int, world_size: int) -> str:
    mesh = init_device_mesh("cpu", (world_size,))
    full, template = _sharded(mesh)
    full = {**full, "plain_local": torch.ones(3), "value": "v"}
    for meta in (False, True):
        local = {k: v for k, v in template.items()}
        if meta:
            local = {k: (DTensor.from_local(torch.empty_like(v.to_local(), device="meta"), v.device_mesh, v.placements, shape=v.shape, stride=v.stride()) if isinstance(v, DTensor) else v) for k, v in local.items()}
        local["plain_local"] = torch.zeros(3)
        ours_local, theirs_local = copy.copy(local), copy.copy(local)
        if not meta:  # torch writes into the DTensors in place: give each its own
            ours_local = {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in local.items()}
            theirs_local = {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in local.items()}
        sdtree.distribute_state_dict(full, ours_local, torch.device("cpu"))
        torch_utils._distribute_state_dict(full, theirs_local, torch.device("cpu"))
        assert list(ours_local) == list(theirs_local)
        for key in ours_local:
            a, b = ours_local[key], theirs_local[key]
            if isinstance(a, DTensor):
                assert a.placements == b.placements and torch.equal(a.to_local(), b.to_local()), key
                assert torch.equal(a.full_tensor(), full[key]), key
            elif isinstance(a, torch.Tensor):
                assert torch.equal(a, b), key
            else:
                assert a == b, key
    return "ok"


def broadcast_matches_torch(rank: int, world_size: int, strict: bool, cpu_offload: bool) -> list[str]:
    mesh = init_device_mesh("cpu", (world_size,))
    full, template = _sharded(mesh)
    full = {**full, "plain_local": torch.ones(3), "value": "v"}
    local = {k: v.clone() for k, v in template.items()}
    local["plain_local"] = torch.zeros(3)
    local["only_local"] = torch.zeros(1)
    local["value"] = "old"
    ours_local = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in local.items()}
    theirs_local = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in local.items()}
    given = full if rank == 0 else {}
    sdtree.broadcast_state_dict(given, ours_local, torch.device("cpu"), strict=strict, cpu_offload=cpu_offload)
    torch_utils._broadcast_state_dict(given, theirs_local, torch.device("cpu"), strict=strict, cpu_offload=cpu_offload)
    assert list(ours_local) == list(theirs_local)
    for key in ours_local:
        a, b = ours_local[key], theirs_local[key]
        if isinstance(a, DTensor):
            assert torch.equal(a.to_local(), b.to_local()) and torch.equal(a.full_tensor(), full[key]), key
        elif isinstance(a, torch.Tensor):
            assert torch.equal(a, b) and a.device == b.device, key
        else:
            assert a == b, key
    dist.barrier()
    return sorted(ours_local)


def broadcast_places_shards_as_buckets_arrive(rank: int, world_size: int) -> list:
    from sdtree.transforms.distributed import broadcast_from_rank0, shard_as

    mesh = init_device_mesh("cpu", (world_size,))
    full, template = _sharded(mesh)
    seen = []

    def place(path, tensor):
        seen.append(path)
        target = template.get(path[0])
        return shard_as(tensor, target) if isinstance(target, DTensor) else tensor

    out = broadcast_from_rank0(bucket_bytes=64, place=place)(full if rank == 0 else {})
    assert [p for p in seen] == [(k,) for k, v in full.items() if isinstance(v, torch.Tensor)]
    for key, value in out.items():
        if isinstance(template[key], DTensor):
            assert isinstance(value, DTensor) and value.placements == template[key].placements
            assert torch.equal(value.full_tensor(), full[key]), key
        else:
            assert torch.equal(value, full[key])
    return len(seen)
