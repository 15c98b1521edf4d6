"""Test bodies for FSDP1 (``FullyShardedDataParallel``), run on every rank.

Ground truth: the same model and optimizer trained unsharded in this process
on the same batches (every rank trains on the same data, so averaged
gradients equal the unsharded ones); and torch's own functions where they
work on CPU/gloo (its full state dict with ``cpu_offload`` crashes there).
"""

from __future__ import annotations

import warnings

import torch
import torch.distributed as dist
from torch.distributed.checkpoint import state_dict as dsd

import sdtree
from sdtree import StateDictOptions
from sdtree._tree import tree_map
from sdtree.testing import assert_state_dict_equal
from sdtree.transforms.tensors import is_sharded_tensor
from tests.adapters.models import Block, make, train
from tests.distributed.bodies_sharded import GET_OPTIONS, check_round_trip, load_faulty


def _wrap(model, orig: bool):
    from torch.distributed.fsdp import FullyShardedDataParallel
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # FSDP1 is deprecated in favour of fully_shard
        return FullyShardedDataParallel(
            model, auto_wrap_policy=ModuleWrapPolicy({Block}), use_orig_params=orig, device_id=torch.device("cpu")
        )


def _optim(model, kind: str, orig: bool, frozen: bool = False):
    """Several param groups: by name (weights / the rest) with
    use_orig_params, by FSDP unit (blocks / the rest) without (FSDP1 keeps a
    flat parameter in one group), and an empty group."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad or not frozen]
    if orig:
        first = [p for n, p in named if n.endswith("weight")]
        rest = [p for n, p in named if not n.endswith("weight")]
    else:
        first = [p for n, p in named if "blocks." in n]
        rest = [p for n, p in named if "blocks." not in n]
    spec = [{"params": first, "weight_decay": 0.1}, {"params": rest, "lr": 0.05}, {"params": [], "lr": 0.3}]
    if kind == "sgd":
        return torch.optim.SGD(spec, lr=1e-2, momentum=0.9)
    return torch.optim.Adam(spec, lr=1e-2)


def _unsharded(orig: bool, kind: str = "sgd", seed: int = 0, frozen: bool = False):
    model, _ = make(seed=seed, frozen=frozen)
    return model, _optim(model, kind, orig, frozen)


def _setup(orig: bool, kind: str = "sgd", seed: int = 0, frozen: bool = False):
    model, _ = make(seed=seed, frozen=frozen)
    sharded = _wrap(model, orig)
    return sharded, _optim(sharded, kind, orig, frozen)


def _truth(orig: bool, kind: str = "sgd", steps: int = 2, frozen: bool = False):
    """Unsharded ground truth. SGD: Adam turns float noise in near-zero
    gradients into full +-lr steps, so only SGD compares across reductions."""
    model, optim = _unsharded(orig, kind, frozen=frozen)
    train(model, optim, steps=steps, seed=0)
    return sdtree.get_state_dict(model, optim)


def _sorted_groups(osd):
    """FSDP1 lists a group's parameters in flat-parameter order: compare sets."""
    return {**osd, "param_groups": [{**g, "params": sorted(g["params"])} for g in osd["param_groups"]]}


def _locals(tree):
    """ShardedTensors as (global shape, this rank's shards) for comparison."""

    def local(value):
        if is_sharded_tensor(value):
            shards = [(tuple(s.metadata.shard_offsets), s.tensor) for s in value.local_shards()]
            return {"shape": tuple(value.size()), "shards": shards}
        return value

    return tree_map(local, tree)


def get_matches_torch_and_truth(rank: int, world_size: int, orig: bool) -> list[str]:
    model, optim = _setup(orig)
    train(model, optim, steps=2, seed=0)
    truth = _truth(orig)
    checked = []
    for name, opts in {**GET_OPTIONS, "sharded_cpu": {"cpu_offload": True}}.items():
        ours = sdtree.get_state_dict(model, optim, options=StateDictOptions(**opts))
        if name != "full_cpu":  # torch's crashes on CPU (FSDP1's offload_to_cpu)
            theirs = dsd.get_state_dict(model, optim, options=dsd.StateDictOptions(**opts))
            assert list(ours[0]) == list(theirs[0]), name
            assert_state_dict_equal(_locals(ours), _locals(theirs))
        if name == "sharded":
            assert is_sharded_tensor(ours[0]["blocks.0.linear1.weight"])
            assert is_sharded_tensor(ours[1]["state"]["blocks.0.linear1.weight"]["momentum_buffer"])
        if name == "full" or (name == "full_cpu" and rank == 0):
            assert_state_dict_equal(ours[0], truth[0], atol=1e-6, rtol=1e-5)
            assert_state_dict_equal(_sorted_groups(ours[1]), _sorted_groups(truth[1]), atol=1e-6, rtol=1e-5)
        if name == "full_cpu":
            if rank == 0:
                assert all(v.device.type == "cpu" for v in ours[0].values() if isinstance(v, torch.Tensor))
            else:
                assert ours == ({}, {})
        checked.append(name)
    return checked


def round_trip(rank: int, world_size: int, orig: bool, full: bool, flatten: bool = False) -> list[float]:
    opts = StateDictOptions(full_state_dict=full, flatten_optimizer_state_dict=flatten)
    return check_round_trip(lambda seed: _setup(orig, kind="adam", seed=seed), opts)


def load_unsharded_truth(rank: int, world_size: int, orig: bool, broadcast: bool) -> str:
    """A full state dict from the unsharded model loads into FSDP1 (every rank
    passing it, or rank 0 alone with broadcast_from_rank0) and trains as the
    unsharded model does."""
    reference, reference_optim = _unsharded(orig)
    train(reference, reference_optim, steps=2, seed=0)
    truth = sdtree.get_state_dict(reference, reference_optim)
    model, optim = _setup(orig, seed=3)
    opts = StateDictOptions(full_state_dict=True, broadcast_from_rank0=broadcast)
    given = truth if rank == 0 or not broadcast else ({}, {})
    sdtree.set_state_dict(model, optim, model_state_dict=given[0], optim_state_dict=given[1], options=opts)
    got = sdtree.get_state_dict(model, optim, options=StateDictOptions(full_state_dict=True))
    assert_state_dict_equal(got[0], truth[0])
    assert_state_dict_equal(_sorted_groups(got[1]), _sorted_groups(truth[1]))
    ours = train(model, optim, steps=2, seed=5)
    expected = train(reference, reference_optim, steps=2, seed=5)
    assert torch.allclose(torch.tensor(ours), torch.tensor(expected), rtol=1e-5, atol=1e-6), (ours, expected)
    return "ok"


def frozen_in_flat_parameter(rank: int, world_size: int) -> str:
    """use_orig_params=True: a frozen parameter shares a flat parameter with
    trainable ones; ignore_frozen_params leaves it out; loads keep it."""
    model, optim = _setup(True, frozen=True)
    train(model, optim, steps=2, seed=0)
    truth = _truth(True, frozen=True)
    full = StateDictOptions(full_state_dict=True)
    msd, osd = sdtree.get_state_dict(model, optim, options=full)
    assert_state_dict_equal(msd, truth[0], atol=1e-6, rtol=1e-5)
    assert_state_dict_equal(_sorted_groups(osd), _sorted_groups(truth[1]), atol=1e-6, rtol=1e-5)
    no_frozen = sdtree.get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, ignore_frozen_params=True))
    assert "blocks.0.linear1.weight" not in no_frozen and "blocks.0.linear2.weight" in no_frozen
    theirs = dsd.get_model_state_dict(model, options=dsd.StateDictOptions(full_state_dict=True, ignore_frozen_params=True))
    assert list(no_frozen) == list(theirs)
    fresh, fresh_optim = _setup(True, seed=4, frozen=True)
    sdtree.set_state_dict(fresh, fresh_optim, model_state_dict=msd, optim_state_dict=osd, options=full)
    assert_state_dict_equal(sdtree.get_state_dict(fresh, fresh_optim, options=full), (msd, osd))
    return "ok"


def get_does_not_step(rank: int, world_size: int, orig: bool) -> str:
    """An optimizer with no state yet reports torch's initial state without
    being stepped: parameters, grads and optimizer state stay as they were."""
    model, optim = _setup(orig, kind="adam")
    before = sdtree.get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
    osd = sdtree.get_optimizer_state_dict(model, optim, options=StateDictOptions(full_state_dict=True))
    assert not optim.state
    assert all(p.grad is None for p in model.parameters())
    assert_state_dict_equal(sdtree.get_model_state_dict(model, options=StateDictOptions(full_state_dict=True)), before)
    theirs = dsd.get_optimizer_state_dict(model, optim, options=dsd.StateDictOptions(full_state_dict=True))
    assert_state_dict_equal(osd, theirs)  # torch steps the optimizer to get there
    return "ok"


def bad_input_on_one_rank(rank: int, world_size: int, orig: bool, fault: str, bad_rank: int) -> str:
    model, optim = _setup(orig)
    return load_faulty(rank, model, optim, fault, bad_rank)


def dcp_round_trip(rank: int, world_size: int, orig: bool, path: str) -> str:
    """The flow of torch's test_fsdp_optim_state.py: sharded model and
    optimizer state dicts saved with dcp.save, loaded with dcp.load into a
    freshly built FSDP1 model, and training continues identically."""
    import torch.distributed.checkpoint as dcp

    model, optim = _setup(orig, kind="adam")
    train(model, optim, steps=2, seed=0)
    msd, osd = sdtree.get_state_dict(model, optim)
    dcp.save({"model": msd, "optim": osd}, checkpoint_id=path)
    dist.barrier()
    fresh, fresh_optim = _setup(orig, kind="adam", seed=6)
    train(fresh, fresh_optim, steps=1, seed=3)  # state to be replaced
    msd2, osd2 = sdtree.get_state_dict(fresh, fresh_optim)
    state = {"model": msd2, "optim": osd2}
    dcp.load(state, checkpoint_id=path)
    sdtree.set_state_dict(fresh, fresh_optim, model_state_dict=state["model"], optim_state_dict=state["optim"])
    full = StateDictOptions(full_state_dict=True)
    assert_state_dict_equal(sdtree.get_state_dict(fresh, fresh_optim, options=full), sdtree.get_state_dict(model, optim, options=full))
    assert train(model, optim, steps=2, seed=5) == train(fresh, fresh_optim, steps=2, seed=5)
    return "ok"


def gather_sharded_tensors(rank: int, world_size: int) -> str:
    """Legacy ShardedTensors gather to full tensors: FSDP1's dim-0 chunks
    (against torch's ``_gather_state_dict``) and other layouts (dim-1
    chunks, uneven, several shards on one rank), with and without offload."""
    from torch.distributed import _state_dict_utils as torch_utils
    from torch.distributed._shard.sharded_tensor import init_from_local_shards
    from torch.distributed._shard.sharded_tensor.metadata import ShardMetadata
    from torch.distributed._shard.sharded_tensor.shard import Shard

    model, optim = _setup(True)
    train(model, optim, steps=1, seed=0)
    msd, osd = sdtree.get_state_dict(model, optim)
    sharded = {"model": msd, "optim": osd}
    ours = sdtree.gather_state_dict(sharded)
    assert_state_dict_equal(ours, torch_utils._gather_state_dict(sharded))
    assert_state_dict_equal(ours["model"], sdtree.get_model_state_dict(model, options=StateDictOptions(full_state_dict=True)))
    offloaded = sdtree.gather_state_dict(sharded, cpu_offload=True, ranks_only=(1,))
    assert (offloaded == {}) == (rank != 1)

    full = torch.arange(5 * 7, dtype=torch.float32).view(5, 7)
    # rank 0: columns 0-2 ; rank 1: columns 3-4 and 5-6 (two shards, listed out of order)
    layout = {0: [(0, 3)], 1: [(5, 2), (3, 2)]}
    shards = [
        Shard(full[:, start : start + width].clone(), ShardMetadata([0, start], [5, width], f"rank:{rank}/cpu"))
        for start, width in layout[rank]
    ]
    columns = init_from_local_shards(shards, [5, 7])
    gathered = sdtree.gather_state_dict({"columns": columns, "n": 3})
    assert_state_dict_equal(gathered, {"columns": full, "n": 3})
    return "ok"
