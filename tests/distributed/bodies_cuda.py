"""Test bodies on CUDA: one GPU, an NCCL process group of one rank.

The paths the gloo tests cover, with the model, the DTensors, the buckets
and the process group's device on CUDA, and CPU results pinned where torch
pins them. Results are checked against torch's own functions, and state
dicts against the same model trained on CPU without sharding.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed import _state_dict_utils as torch_utils
from torch.distributed.checkpoint import state_dict as dsd
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Shard, distribute_tensor

import sdtree
from sdtree import StateDictOptions
from sdtree._tree import tree_flatten, tree_map
from sdtree.testing import assert_state_dict_equal
from tests.adapters.models import make, make_optim, train
from tests.distributed.bodies_sharded import GET_OPTIONS, _local, check_round_trip


def _cpu(tree):
    return tree_map(lambda v: v.cpu() if isinstance(v, torch.Tensor) else v, tree)


def _build(kind: str, seed: int = 0):
    model, _ = make(seed=seed)
    model = model.cuda()
    if kind == "fsdp2":
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cuda", (dist.get_world_size(),))
        for block in model.blocks:
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
    return model, make_optim(model, "sgd")


def _devices(tree) -> list[str]:
    return [leaf.device.type for leaf in tree_flatten(tree)[0] if isinstance(leaf, torch.Tensor)]


def get_matches_torch_and_truth(rank: int, world_size: int, kind: str) -> list[str]:
    model, optim = _build(kind)
    train(model, optim, steps=2, seed=0)
    truth_model, truth_optim = make(seed=0, optim="sgd")
    train(truth_model, truth_optim, steps=2, seed=0)
    truth = sdtree.get_state_dict(truth_model, truth_optim)
    checked = []
    for name, opts in GET_OPTIONS.items():
        ours = sdtree.get_state_dict(model, optim, options=StateDictOptions(**opts))
        theirs = dsd.get_state_dict(model, optim, options=dsd.StateDictOptions(**opts))
        assert list(ours[0]) == list(theirs[0]), name
        assert_state_dict_equal(_local(ours), _local(theirs), check_device=True)
        assert _devices(ours) == _devices(theirs), name
        if opts.get("cpu_offload"):
            assert set(_devices(ours)) == {"cpu"}, name
        if name == "full":
            assert set(_devices(ours)) == {"cuda"}
            assert_state_dict_equal(_cpu(ours[0]), truth[0], atol=1e-5, rtol=1e-4)
            assert_state_dict_equal(_cpu(ours[1]), truth[1], atol=1e-5, rtol=1e-4)
        checked.append(name)
    return checked


def round_trip(rank: int, world_size: int, kind: str, full: bool, broadcast: bool) -> list[float]:
    opts = StateDictOptions(full_state_dict=full, broadcast_from_rank0=broadcast)
    return check_round_trip(lambda seed: _build(kind, seed=seed), opts)


def collectives_match_torch(rank: int, world_size: int) -> list[str]:
    mesh = init_device_mesh("cuda", (world_size,))
    full = {f"w{i}": torch.randn(5 + i, 3, device="cuda") for i in range(4)}
    full["step"] = torch.tensor(7.0, device="cuda")
    full["lr"] = 0.5
    sharded = {k: distribute_tensor(v, mesh, [Shard(0)]) if k.startswith("w") else v for k, v in full.items()}
    done = []
    for cpu_offload in (False, True):
        ours = sdtree.gather_state_dict(sharded, cpu_offload=cpu_offload)
        theirs = torch_utils._gather_state_dict(sharded, cpu_offload=cpu_offload)
        assert_state_dict_equal(ours, theirs, check_device=True)
        assert_state_dict_equal(_cpu(ours), _cpu(full))
        done.append(f"gather cpu_offload={cpu_offload}")

    ours = sdtree.offload_state_dict_to_cpu(full)
    theirs = torch_utils._offload_state_dict_to_cpu(full)
    assert_state_dict_equal(ours, theirs, check_device=True)
    assert set(_devices(ours)) == {"cpu"}
    pinned = [[t.is_pinned() for t in tree_flatten(sd)[0] if isinstance(t, torch.Tensor)] for sd in (ours, theirs)]
    assert pinned[0] == pinned[1]
    done.append("offload")

    device = torch.device("cuda")
    for name, util in (("broadcast", "_broadcast_state_dict"), ("distribute", "_distribute_state_dict")):
        ours_local = {k: torch.zeros_like(v) if isinstance(v, DTensor) else v for k, v in sharded.items()}
        theirs_local = {k: torch.zeros_like(v) if isinstance(v, DTensor) else v for k, v in sharded.items()}
        getattr(sdtree, f"{name}_state_dict")(_cpu(full), ours_local, device)
        getattr(torch_utils, util)(_cpu(full), theirs_local, device)
        assert_state_dict_equal(_local(ours_local), _local(theirs_local), check_device=True)
        assert isinstance(ours_local["w0"], DTensor) and ours_local["w0"].device.type == "cuda"
        done.append(name)

    received = sdtree.transforms.distributed.broadcast_from_rank0()(full)
    assert set(_devices(received)) == {"cuda"}
    assert_state_dict_equal(received, full, check_device=True)
    done.append("broadcast_from_rank0")
    return done


def checkpoint_formats(rank: int, world_size: int, directory: str) -> list[str]:
    from sdtree import checkpoint

    model, optim = _build("plain")
    train(model, optim, steps=1)
    # tensors only: safetensors holds no extra state (and refuses it, tested elsewhere)
    msd = {k: v for k, v in sdtree.get_model_state_dict(model).items() if isinstance(v, torch.Tensor)}
    done = []
    for fmt in ("torch", "safetensors", "dcp", "hf"):
        shards = {"max_shard_size": 4096} if fmt == "hf" else {}  # several shards
        path = checkpoint.save(msd, f"{directory}/model.{fmt}", format=fmt, **shards)
        loaded = checkpoint.load(path)
        assert set(_devices(loaded)) == {"cpu"}
        assert_state_dict_equal(loaded, _cpu(msd))
        done.append(fmt)
    return done
