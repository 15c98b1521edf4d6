"""The behaviours of PyTorch's test_state_dict_utils.py (seed 004 and its
newer version), run against sdtree's utilities on CPU/gloo.

Each body states in its docstring what the seed test checks; world size 2
stands in for the seed's 4 where only the set of ranks matters.
"""

from __future__ import annotations

import copy
import io

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Shard, distribute_tensor

import sdtree
from sdtree.testing import assert_state_dict_equal


def _dtensor(mesh, seed: int = 0):
    """A Shard(0) DTensor of 3x3x3 local blocks, and the full tensor every rank gathers."""
    torch.manual_seed(seed + dist.get_rank())
    dtensor = DTensor.from_local(torch.randn(3, 3, 3), mesh, [Shard(0)])
    full = torch.empty(3 * mesh.size(), 3, 3)
    dist.all_gather_into_tensor(full, dtensor.to_local())
    return full, dtensor


def gather_dtensor_to_the_full_tensor(rank: int, world_size: int) -> str:
    """test_gather_state_dict_dtensor: a DTensor gathers to the all-gather of
    its shards, on the shards' device."""
    mesh = init_device_mesh("cpu", (world_size,))
    full, dtensor = _dtensor(mesh)
    gathered = sdtree.gather_state_dict({"dtensor": dtensor})
    assert torch.equal(gathered["dtensor"], full) and gathered["dtensor"].device.type == "cpu"
    assert type(gathered["dtensor"]) is torch.Tensor
    return "ok"


def gather_and_offload_on_some_ranks_only(rank: int, world_size: int) -> str:
    """test_gather_with_cpu_and_ranks_only and test_cpu_and_ranks_only: with
    ranks_only, the listed ranks get CPU tensors and the others ``{}``."""
    mesh = init_device_mesh("cpu", (world_size,))
    full, dtensor = _dtensor(mesh)
    gathered = sdtree.gather_state_dict({"dtensor": dtensor}, cpu_offload=True, ranks_only=(1,))
    offloaded = sdtree.offload_state_dict_to_cpu(
        {"tensor1": torch.arange(10), "tensor2": torch.ones(10)}, ranks_only=(1,)
    )
    if rank == 1:
        assert torch.equal(gathered["dtensor"], full) and gathered["dtensor"].is_cpu
        assert torch.equal(offloaded["tensor1"], torch.arange(10)) and torch.equal(offloaded["tensor2"], torch.ones(10))
    else:
        assert gathered == {} and offloaded == {}
    return "ok"


def gather_a_nested_dict_with_lists(rank: int, world_size: int) -> str:
    """test_complicated_dict: DTensors inside lists gather in place; plain
    tensors pass through."""
    mesh = init_device_mesh("cpu", (world_size,))
    plain, sharded = [], []
    for i in range(10):
        full, dtensor = _dtensor(mesh, seed=10 * i)
        plain += [full, torch.ones(10)]
        sharded += [dtensor, torch.ones(10)]
    full, dtensor = _dtensor(mesh, seed=1000)
    gathered = sdtree.gather_state_dict({"local": dtensor, "list": sharded, "arange": torch.arange(10)})
    expected = {"local": full, "list": plain, "arange": torch.arange(10)}
    assert_state_dict_equal(gathered, expected)
    assert isinstance(gathered["list"], list)
    return "ok"


def create_and_copy_cpu_state_dicts(rank: int, world_size: int) -> str:
    """test_create_cpu_state_dict: the CPU copy (plain, pinned, shared, both)
    has the source's structure, shapes and dtypes (check_state_dict_similarity,
    which a tensor of another shape fails); copy_state_dict fills it with the
    values, in new storage, DTensor shard into DTensor shard; non-tensor
    values (BytesIO, bytes, floats, nested lists) come through."""
    mesh = init_device_mesh("cpu", (world_size,))
    buffer = io.BytesIO()
    torch.save(torch.ones(10), buffer)
    buffer.seek(0)
    state_dict = {
        "tensor1": torch.arange(10),
        "tensor2": torch.ones(10),
        "dtensor": distribute_tensor(torch.arange(50 * world_size).reshape(5 * world_size, 10), mesh, [Shard(0)]),
        "non_tensor_bytes_io": copy.deepcopy(buffer),
        "non_tensor_bytes": buffer.read(),
        "step": torch.tensor(7, dtype=torch.float),
        "lr": 1.5,
        "nested": {"list": [1, 2, 3, 4]},
    }
    for kwargs in ({}, {"pin_memory": True}, {"share_memory": True}, {"share_memory": True, "pin_memory": True}):
        cpu = sdtree.create_cpu_state_dict(state_dict, **kwargs)
        assert sdtree.check_state_dict_similarity(state_dict, cpu)
        assert not sdtree.check_state_dict_similarity(state_dict, {**cpu, "tensor1": torch.arange(11)})
        sdtree.copy_state_dict(state_dict, cpu)
        assert all(v.device == torch.device("cpu") for v in cpu.values() if isinstance(v, torch.Tensor))
        assert torch.equal(cpu["tensor1"], torch.arange(10)) and torch.equal(cpu["tensor2"], torch.ones(10))
        assert isinstance(cpu["dtensor"], DTensor)
        assert torch.equal(cpu["dtensor"].to_local(), torch.arange(50 * rank, 50 + 50 * rank).reshape(5, 10))
        for key in ("tensor1", "tensor2"):
            assert cpu[key].untyped_storage().data_ptr() != state_dict[key].untyped_storage().data_ptr()
        local = cpu["dtensor"].to_local()
        assert local.untyped_storage().data_ptr() != state_dict["dtensor"].to_local().untyped_storage().data_ptr()
        buffer.seek(0)
        cpu["non_tensor_bytes_io"].seek(0)
        assert cpu["non_tensor_bytes_io"].read() == buffer.read()
        buffer.seek(0)
        assert cpu["non_tensor_bytes"] == buffer.read()
        assert cpu["lr"] == 1.5 and cpu["step"] == 7 and cpu["nested"] == {"list": [1, 2, 3, 4]}
    return "ok"


def cpu_copy_of_a_dtensor_follows_its_source(rank: int, world_size: int) -> str:
    """test_cpu_offload_for_dtensor: the CPU copy of a DTensor is a CPU DTensor;
    each copy_state_dict brings it level with the source, after the source changes."""
    mesh = init_device_mesh("cpu", (world_size,))
    sd = {"k": DTensor.from_local(torch.ones(8, 8), mesh, [Shard(0)])}
    cpu = sdtree.create_cpu_state_dict(sd)
    assert isinstance(cpu["k"], DTensor) and cpu["k"].is_cpu and cpu["k"]._local_tensor.is_cpu
    cpu["k"]._local_tensor.zero_()  # new memory holds anything: make the first check meaningful
    assert not torch.equal(sd["k"].full_tensor(), cpu["k"].full_tensor())
    for _ in range(2):
        sdtree.copy_state_dict(sd, cpu, non_blocking=True)
        assert torch.equal(sd["k"].full_tensor(), cpu["k"].full_tensor())
        sd["k"] += 1
        assert not torch.equal(sd["k"].full_tensor(), cpu["k"].full_tensor())
    return "ok"
