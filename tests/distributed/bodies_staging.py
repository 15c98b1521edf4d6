"""Test bodies for sdtree.Stager over DTensors, ShardedTensors and FSDP2, run on every rank."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed._shard.sharded_tensor import ShardedTensor
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor

import sdtree
from sdtree._tree import tree_map
from sdtree.errors import StagingMismatchError
from sdtree.testing import assert_state_dict_equal
from sdtree.transforms.tensors import local_tensors
from tests.adapters.models import train
from tests.distributed.bodies_sharded import _shard
from tests.distributed.bodies_utils import _sharded, _sharded_tensor, _storage


def _local_copy(tree):
    """Every tensor's local data, cloned (what a checkpoint of ``tree`` must hold)."""
    return tree_map(lambda v: [t.clone() for t in local_tensors(v)] if isinstance(v, torch.Tensor) else v, tree)


def _sources(rank: int, mesh, scale: float = 1.0):
    full, sharded = _sharded(mesh)
    full = {k: v * scale if v.is_floating_point() else v for k, v in full.items()}
    _, sharded = _sharded(mesh)
    for key, value in sharded.items():
        if isinstance(value, DTensor):
            sharded[key] = distribute_tensor(full[key], mesh, value.placements)
        else:
            sharded[key] = full[key]
    sharded["dscalar"] = distribute_tensor(torch.tensor(3.0 * scale), mesh, [Replicate()])
    sharded["st"] = _sharded_tensor(rank, torch.arange(12.0).reshape(4, 3) * scale)
    sharded["nested"] = {"plain": torch.arange(5.0) * scale, "n": 3, "list": [1, 2]}
    return full, sharded


def mirror_keeps_dtensors_and_sharded_tensors(rank: int, world_size: int) -> str:
    """The mirror has the source's structure: DTensors (same mesh, placements,
    shape, stride) over CPU local tensors, ShardedTensors over CPU shards;
    a state dict of new tensor objects is staged, one of another sharding is refused."""
    mesh = init_device_mesh("cpu", (world_size,))
    _, sharded = _sources(rank, mesh)
    stager = sdtree.Stager(sharded, share_memory=True)
    mirror = stager.stage(sharded)
    for key, value in sharded.items():
        got = mirror[key]
        assert type(got) is type(value), (key, type(got))
        if isinstance(value, DTensor):
            assert (got.device_mesh, got.placements, got.shape, got.stride(), got.dtype) == (
                value.device_mesh, value.placements, value.shape, value.stride(), value.dtype
            ), key
            local = got._local_tensor
            assert local.is_cpu and local.is_shared() and torch.equal(local, value._local_tensor), key
            assert local.numel() == 0 or _storage(local) != _storage(value._local_tensor), key
        elif isinstance(value, ShardedTensor):
            assert got.metadata() == value.metadata() and got._process_group is value._process_group
            (mine,), (source,) = got.local_shards(), value.local_shards()
            assert mine.metadata == source.metadata and torch.equal(mine.tensor, source.tensor)
            assert _storage(mine.tensor) != _storage(source.tensor)
    assert mirror["nested"]["n"] == 3 and torch.equal(mirror["nested"]["plain"], sharded["nested"]["plain"])
    # new objects, new values (torchtitan#3675): staged into the same buffers
    ptr = mirror["even"]._local_tensor.data_ptr()
    _, again = _sources(rank, mesh, scale=2.0)
    second = stager.stage(again)
    assert second["even"]._local_tensor.data_ptr() == ptr
    assert_state_dict_equal(_local_copy(second), _local_copy(again))
    # another sharding of the same key: refused, naming it
    other = {**again, "even": distribute_tensor(torch.zeros(4, 3), mesh, [Replicate()])}
    try:
        stager.stage(other)
    except StagingMismatchError as err:
        assert "state_dict['even']: expected DTensor(4, 3) torch.float32 [Shard(dim=0)]" in str(err), err
        assert "found DTensor(4, 3) torch.float32 [Replicate()]" in str(err), err
    else:
        raise AssertionError("a DTensor of another sharding was staged")
    return "ok"


def fsdp2_async_save_round_trip(rank: int, world_size: int, path: str) -> str:
    """FSDP2 model and optimizer state dicts, staged by the stager and saved by
    dcp.async_save, load back as they were at the call, though training
    changes the sources at once; the second checkpoint (new state dict objects) too."""
    model, optim = _shard("fsdp2")
    train(model, optim)
    save_group = dist.new_group(backend="gloo")  # the save's collectives run beside training's
    stager = None
    for step in (1, 2):
        msd, osd = sdtree.get_state_dict(model, optim)
        state = {"model": msd, "optim": osd, "step": step}
        if stager is None:
            stager = sdtree.Stager(state)
        expected = _local_copy(state)
        future = dcp.async_save(state, checkpoint_id=f"{path}/{step}", async_stager=stager, process_group=save_group)
        with torch.no_grad():  # training goes on: the sources change before the save has run
            for p in model.parameters():
                p.add_(1.0)
            for s in optim.state.values():
                s["exp_avg"].add_(1.0)
        future.result()
        template = tree_map(lambda v: torch.zeros_like(v) if isinstance(v, torch.Tensor) else v, state)
        template["step"] = 0
        dcp.load(template, checkpoint_id=f"{path}/{step}", process_group=save_group)
        assert template["step"] == step
        assert_state_dict_equal(_local_copy(template), expected)
    stager.close()
    dist.destroy_process_group(save_group)
    return "ok"


def full_state_dict_gathers_into_the_mirror(rank: int, world_size: int) -> list[str]:
    """full_state_dict: the mirror holds full CPU tensors, and each stage
    gathers into the same buffers (their data_ptr is kept)."""
    mesh = init_device_mesh("cpu", (world_size,))
    full, sharded = _sources(rank, mesh)
    sharded["st"] = _sharded_tensor(rank, torch.arange(12.0).reshape(4, 3))
    stager = sdtree.Stager(sharded, full_state_dict=True)
    first = stager.stage(sharded)
    ptrs = {k: v.data_ptr() for k, v in first.items() if isinstance(v, torch.Tensor)}
    _, again = _sources(rank, mesh, scale=3.0)
    again["st"] = _sharded_tensor(rank, torch.arange(12.0).reshape(4, 3) * 3)
    second = stager.stage(again)
    for key, value in again.items():
        got = second[key]
        if isinstance(value, DTensor):
            assert type(got) is torch.Tensor and got.is_cpu, key
            assert torch.equal(got, value.full_tensor()), key
        elif isinstance(value, ShardedTensor):
            assert type(got) is torch.Tensor and torch.equal(got, torch.arange(12.0).reshape(4, 3) * 3)
        if isinstance(got, torch.Tensor):
            assert got.data_ptr() == ptrs[key], key  # the same buffers: no fresh memory per checkpoint
    assert torch.equal(second["nested"]["plain"], torch.arange(5.0) * 3)
    # one rank's bad input: every rank raises, none hangs in a gather
    bad = dict(again)
    if rank == 1:
        bad["uneven"] = DTensor.from_local(torch.zeros(3, 3), mesh, [Shard(0)], run_check=False, shape=(6, 3), stride=(3, 1))
    try:
        stager.stage(bad)
    except StagingMismatchError as err:
        assert "rank 1 of 2" in str(err) and "state_dict['uneven']" in str(err), err
    else:
        raise AssertionError("a bad state dict on rank 1 was staged")
    return sorted(k for k, v in sharded.items() if isinstance(v, (DTensor, ShardedTensor)))
