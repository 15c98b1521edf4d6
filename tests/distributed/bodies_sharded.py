"""Test bodies for sharded setups (FSDP2, tensor parallel), run on every rank.

Ground truth: the same model and optimizer trained unsharded in this process
on the same data (every rank trains on the same batches, so averaged
gradients equal the unsharded ones).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed.checkpoint import state_dict as dsd
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor

import sdtree
from sdtree import StateDictOptions
from sdtree._tree import tree_map
from sdtree.testing import assert_state_dict_equal
from tests.adapters.models import make, make_optim, train


def _local(tree):
    return tree_map(lambda v: v.to_local() if isinstance(v, DTensor) else v, tree)


def _shard(kind: str, seed: int = 0, groups: bool = False, optim: str = "adam"):
    model, _ = make(seed=seed)
    world = dist.get_world_size()
    if kind.startswith("fsdp2"):
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cpu", (world,))
        reshard = kind == "fsdp2"
        for block in model.blocks:
            fully_shard(block, mesh=mesh, reshard_after_forward=reshard)
        fully_shard(model, mesh=mesh, reshard_after_forward=reshard)
    elif kind == "hsdp":
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cpu", (2, world // 2), mesh_dim_names=("replicate", "shard"))
        for block in model.blocks:
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
    elif kind == "fsdp2_tp":
        from torch.distributed.fsdp import fully_shard
        from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

        mesh = init_device_mesh("cpu", (2, world // 2), mesh_dim_names=("dp", "tp"))
        for block in model.blocks:
            parallelize_module(block, mesh["tp"], {"linear1": ColwiseParallel(), "linear2": RowwiseParallel()})
            fully_shard(block, mesh=mesh["dp"])
        fully_shard(model, mesh=mesh["dp"])
    elif kind == "tp":
        from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

        mesh = init_device_mesh("cpu", (world,))
        for block in model.blocks:
            parallelize_module(block, mesh, {"linear1": ColwiseParallel(), "linear2": RowwiseParallel()})
    else:
        raise ValueError(kind)
    return model, make_optim(model, optim, groups=groups)


def _truth(groups: bool = False, steps: int = 2, optim: str = "sgd"):
    """Unsharded ground truth. SGD: Adam turns float noise in near-zero
    gradients into full +-lr steps, so only SGD compares across reductions."""
    model, optim = make(seed=0, groups=groups, optim=optim)
    train(model, optim, steps=steps, seed=0)
    return sdtree.get_state_dict(model, optim)


GET_OPTIONS = {
    "sharded": {},
    "full": {"full_state_dict": True},
    "full_cpu": {"full_state_dict": True, "cpu_offload": True},
    "flatten_full": {"full_state_dict": True, "flatten_optimizer_state_dict": True},
}


def get_matches_torch_and_truth(rank: int, world_size: int, kind: str) -> list[str]:
    model, optim = _shard(kind, groups=True, optim="sgd")
    train(model, optim, steps=2, seed=0)
    truth = _truth(groups=True)
    checked = []
    for name, opts in GET_OPTIONS.items():
        ours = sdtree.get_state_dict(model, optim, options=StateDictOptions(**opts))
        theirs = dsd.get_state_dict(model, optim, options=dsd.StateDictOptions(**opts))
        assert list(ours[0]) == list(theirs[0]), name
        assert_state_dict_equal(_local(ours), _local(theirs))
        if name == "full" or (name == "full_cpu" and rank == 0):
            assert_state_dict_equal(ours[0], truth[0], atol=1e-6, rtol=1e-5)
            assert_state_dict_equal(ours[1], truth[1], atol=1e-6, rtol=1e-5)
        if name == "full_cpu" and rank != 0:
            assert ours == ({}, {})
        checked.append(name)
    return checked


def round_trip(rank: int, world_size: int, kind: str, full: bool) -> list[float]:
    return check_round_trip(lambda seed: _shard(kind, seed=seed), StateDictOptions(full_state_dict=full))


def check_round_trip(build, opts: StateDictOptions) -> list[float]:
    """get -> set into a freshly built model (``build(seed)``) -> identical
    state and identical training; return the losses."""
    model, optim = build(0)
    train(model, optim, steps=2, seed=0)
    msd, osd = sdtree.get_state_dict(model, optim, options=opts)
    fresh, fresh_optim = build(9)
    sdtree.set_state_dict(fresh, fresh_optim, model_state_dict=msd, optim_state_dict=osd, options=opts)
    full_opts = StateDictOptions(full_state_dict=True)
    assert_state_dict_equal(
        sdtree.get_state_dict(fresh, fresh_optim, options=full_opts), sdtree.get_state_dict(model, optim, options=full_opts)
    )
    losses = train(model, optim, steps=2, seed=5)
    assert losses == train(fresh, fresh_optim, steps=2, seed=5)
    return losses


def broadcast_into_sharded(rank: int, world_size: int, kind: str) -> str:
    truth = _truth(optim="adam")
    model, optim = _shard(kind, seed=3)
    opts = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
    given = truth if rank == 0 else ({}, {})
    sdtree.set_state_dict(model, optim, model_state_dict=given[0], optim_state_dict=given[1], options=opts)
    got = sdtree.get_state_dict(model, optim, options=StateDictOptions(full_state_dict=True))
    assert_state_dict_equal(got[0], truth[0])
    assert_state_dict_equal(got[1], truth[1])
    assert isinstance(model.blocks[0].linear1.weight, DTensor)  # still sharded after the load
    return "ok"


def bad_input_on_one_rank(rank: int, world_size: int, kind: str, fault: str, bad_rank: int) -> str:
    model, optim = _shard(kind)
    return load_faulty(rank, model, optim, fault, bad_rank)


def load_faulty(rank: int, model, optim, fault: str, bad_rank: int) -> str:
    """Load a full state dict spoiled by ``fault`` on ``bad_rank`` only: every
    rank raises the same error, naming the bad rank; no rank writes."""
    train(model, optim, steps=1, seed=0)
    opts = StateDictOptions(full_state_dict=True)
    msd, osd = sdtree.get_state_dict(model, optim, options=opts)
    before = sdtree.get_state_dict(model, optim, options=opts)
    if rank == bad_rank:
        msd = dict(msd)
        if fault == "missing":
            del msd["head.weight"]
        elif fault == "shape":
            msd["head.weight"] = torch.zeros(3, 3)
        elif fault == "dtype":
            msd["head.weight"] = torch.zeros(16, 8, dtype=torch.int64)
        elif fault == "optim_shape":
            state = dict(osd["state"])
            name = next(iter(state["head.weight"]))
            state["head.weight"] = {**state["head.weight"], name: torch.zeros(2)}
            osd = {**osd, "state": state}
    try:
        sdtree.set_state_dict(model, optim, model_state_dict=msd, optim_state_dict=osd, options=opts)
    except sdtree.errors.IncompatibleStateDictError as err:
        message = str(err)
    else:
        message = "no error"
    assert_state_dict_equal(sdtree.get_state_dict(model, optim, options=opts), before)
    return message


def dcp_save(rank: int, world_size: int, kind: str, path: str) -> tuple:
    """Train, save through torch.distributed.checkpoint; return the full state dicts."""
    import torch.distributed.checkpoint as dcp

    model, optim = _shard(kind)
    train(model, optim, steps=2, seed=0)
    msd, osd = sdtree.get_state_dict(model, optim)
    dcp.save({"model": msd, "optim": osd}, checkpoint_id=path)
    full = sdtree.get_state_dict(model, optim, options=StateDictOptions(full_state_dict=True))
    return full if rank == 0 else None


def dcp_load(rank: int, world_size: int, kind: str, path: str) -> tuple:
    """Load a checkpoint saved at another world size; return the full state dicts."""
    import torch.distributed.checkpoint as dcp

    model, optim = _shard(kind, seed=7)
    msd, osd = sdtree.get_state_dict(model, optim)
    state = {"model": msd, "optim": osd}
    dcp.load(state, checkpoint_id=path)
    sdtree.set_state_dict(model, optim, model_state_dict=state["model"], optim_state_dict=state["optim"])
    full = sdtree.get_state_dict(model, optim, options=StateDictOptions(full_state_dict=True))
    return full if rank == 0 else None
