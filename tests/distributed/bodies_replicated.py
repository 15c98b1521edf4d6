"""Test bodies run on every rank of the worker pool: DDP and composable replicate.

Each body is ``fn(rank, world_size, *args)``; it asserts on its rank and
returns something small for the parent to check.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed.checkpoint import state_dict as dsd
from torch.nn.parallel import DistributedDataParallel as DDP

import sdtree
from sdtree import StateDictOptions
from sdtree._collectives import OBJECT_FIRST_BYTES
from sdtree.testing import assert_state_dict_equal
from tests.adapters.models import make, make_optim, snapshot_optim, train


def _wrap(kind: str, seed: int = 0, groups: bool = False):
    model, _ = make(seed=seed)
    if kind == "ddp":
        model = DDP(model)
    else:
        from torch.distributed._composable import replicate

        replicate(model)
    return model, make_optim(model, "adam", groups=groups)


def matches_torch(rank: int, world_size: int, kind: str) -> list[str]:
    model, optim = _wrap(kind, groups=True)
    train(model, optim, steps=2, seed=rank)  # different data per rank; DDP averages grads
    checked = []
    for name, opts in {
        "default": {},
        "flatten": {"flatten_optimizer_state_dict": True},
        "full_cpu": {"full_state_dict": True, "cpu_offload": True},
        "cpu": {"cpu_offload": True},
    }.items():
        ours = sdtree.get_state_dict(model, optim, options=StateDictOptions(**opts))
        theirs = dsd.get_state_dict(model, optim, options=dsd.StateDictOptions(**opts))
        assert list(ours[0]) == list(theirs[0]), name
        assert_state_dict_equal(ours[0], theirs[0])
        assert_state_dict_equal(ours[1], theirs[1])
        if name == "full_cpu" and rank != 0:
            assert ours == ({}, {})
        checked.append(name)
    msd = sdtree.get_model_state_dict(model)
    assert not any(k.startswith("module.") for k in msd)
    return checked


def round_trip(rank: int, world_size: int, kind: str) -> list[float]:
    model, optim = _wrap(kind)
    train(model, optim, steps=2, seed=rank)
    msd, osd = sdtree.get_state_dict(model, optim)
    fresh, fresh_optim = _wrap(kind, seed=7)
    result = sdtree.set_state_dict(fresh, fresh_optim, model_state_dict=msd, optim_state_dict=osd)
    assert result.missing_keys == [] and result.unexpected_keys == []
    assert_state_dict_equal(snapshot_optim(fresh_optim), snapshot_optim(optim))
    assert_state_dict_equal(fresh.state_dict(), model.state_dict())
    losses = train(model, optim, steps=2, seed=10 + rank)
    assert losses == train(fresh, fresh_optim, steps=2, seed=10 + rank)
    gathered: list = [None] * world_size
    dist.all_gather_object(gathered, sdtree.get_model_state_dict(fresh)["head.weight"].sum().item())
    assert gathered[0] == gathered[1]  # replicas stay identical
    return losses


def offload_ranks_only(rank: int, world_size: int) -> int:
    sd = {"w": torch.ones(2), "nested": {"b": torch.zeros(1)}}
    ours = sdtree.offload_state_dict_to_cpu(sd, ranks_only=(1,))
    from torch.distributed._state_dict_utils import _offload_state_dict_to_cpu

    theirs = _offload_state_dict_to_cpu(sd, ranks_only=(1,))
    assert ours == theirs if rank == 0 else list(ours) == list(theirs)
    return len(ours)


def broadcast_load(rank: int, world_size: int, kind: str) -> str:
    trained, trained_optim = _wrap(kind)
    train(trained, trained_optim, steps=2, seed=0)
    msd, osd = sdtree.get_state_dict(trained, trained_optim)
    opts = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
    ours, ours_optim = _wrap(kind, seed=3 + rank)  # ranks start different
    theirs, theirs_optim = _wrap(kind, seed=3 + rank)
    given = (msd, osd) if rank == 0 else ({}, {})
    sdtree.set_state_dict(ours, ours_optim, model_state_dict=given[0], optim_state_dict=given[1], options=opts)
    # torch's set_state_dict skips the model on ranks that pass {} (it takes an
    # empty model state dict as "optimizer only") and hangs: load the parts apart.
    torch_opts = dsd.StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
    dsd.set_model_state_dict(theirs, dict(given[0]), options=torch_opts)
    dsd.set_optimizer_state_dict(theirs, theirs_optim, given[1], options=torch_opts)
    assert_state_dict_equal(ours.state_dict(), trained.state_dict())
    assert_state_dict_equal(ours.state_dict(), theirs.state_dict())
    assert_state_dict_equal(snapshot_optim(ours_optim), snapshot_optim(trained_optim))
    ours_osd, theirs_osd = snapshot_optim(ours_optim), snapshot_optim(theirs_optim)
    assert_state_dict_equal(ours_osd["state"], theirs_osd["state"])
    # torch's broadcast turns tuples into lists (betas); sdtree keeps them as saved
    assert [{k: tuple(v) if isinstance(v, list) and k != "params" else v for k, v in g.items()} for g in theirs_osd["param_groups"]] == ours_osd["param_groups"]
    if rank == 0:
        assert msd.keys() == sdtree.get_model_state_dict(trained).keys()  # rank 0's input untouched
    return "ok"


def broadcast_rank0_empty(rank: int, world_size: int) -> str:
    model, _ = _wrap("ddp")
    opts = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
    try:
        sdtree.set_model_state_dict(model, {}, options=opts)
    except sdtree.errors.IncompatibleStateDictError as err:
        return str(err)
    return "no error"


def broadcast_transform(rank: int, world_size: int) -> list:
    from collections import OrderedDict

    from sdtree.transforms.distributed import broadcast_from_rank0

    sd = {
        "a": torch.arange(6.0).view(2, 3),
        "b": torch.tensor(3),
        "c": (1, [torch.ones(2, dtype=torch.bfloat16), None]),
        "d": OrderedDict(x=torch.zeros(0, 4), y="s"),
        7: torch.tensor([True, False]),
    }
    out = broadcast_from_rank0(bucket_bytes=16)(sd if rank == 0 else {})
    assert_state_dict_equal(out, sd)
    assert isinstance(out["c"], tuple) and isinstance(out["d"], OrderedDict)
    return sorted(map(str, out))


def broadcast_flat_state_dict(rank: int, world_size: int) -> list:
    """A one-level dict of tensors and scalars travels as its keys: same
    type, order, values and dtypes on every rank; rank 0 keeps its own
    tensors (detached) rather than views of the bucket it sent."""
    from collections import OrderedDict

    from sdtree.transforms.distributed import broadcast_from_rank0

    sd = OrderedDict(
        [
            ("w", torch.nn.Parameter(torch.arange(6.0).view(2, 3))),
            ("step", 3),
            ("lr", 0.5),
            ("note", None),
            ("half", torch.ones(3, dtype=torch.float16)),
            (5, torch.tensor([1, 2], dtype=torch.int64)),
            ("scalar", torch.tensor(2.0)),
        ]
    )
    seen = []

    def place(path, tensor):
        seen.append(path)
        return tensor

    out = broadcast_from_rank0(bucket_bytes=32, place=place)(sd if rank == 0 else {})
    assert type(out) is OrderedDict and list(out) == list(sd)
    assert_state_dict_equal(out, sd)
    assert seen == [("w",), ("half",), (5,), ("scalar",)]
    assert not out["w"].requires_grad and out["w"].shape == (2, 3)
    if rank == 0:
        assert out["w"].data_ptr() == sd["w"].data_ptr() and out["half"] is sd["half"]
    plain = broadcast_from_rank0()(dict(sd) if rank == 0 else {})
    assert type(plain) is dict and list(plain) == list(sd)
    return [str(k) for k in out]


def announce_then_deliver_into_destinations(rank: int, world_size: int) -> list:
    """announce() gives every rank placeholders of rank 0's state dict before
    any tensor moves; deliver_into() writes each tensor into its destination when
    shape, dtype, contiguity and device fit (a tensor alone in its bucket is
    received straight into it), and hands the others to ``place``."""
    from sdtree.state_dict_utils import deliver_into
    from sdtree.transforms.distributed import announce

    sd = {
        "big": torch.arange(32.0),  # 128 bytes: alone in its bucket
        "a": torch.arange(6.0).view(2, 3),
        "wide": torch.full((4,), 2.0),  # its destination has another dtype
        "strided": torch.arange(6.0).view(3, 2),  # its destination is not contiguous
        "scalar": torch.tensor(5),
        "n": 3,
    }
    announced = announce(sd if rank == 0 else {})
    placeholders = announced.placeholders()
    assert list(placeholders) == list(sd) and placeholders["n"] == 3
    for key in ("big", "a", "wide", "strided", "scalar"):
        ph = placeholders[key]
        assert ph.is_meta and ph.shape == sd[key].shape and ph.dtype == sd[key].dtype, key
    dest = {
        "big": torch.zeros(32),
        "a": torch.zeros(2, 3),
        "wide": torch.zeros(4, dtype=torch.float64),
        "strided": torch.zeros(2, 3).t(),
        "scalar": torch.zeros((), dtype=torch.int64),
    }
    pointers = {key: t.data_ptr() for key, t in dest.items()}
    placed = []

    def place(path, tensor):
        placed.append(path[0])
        return tensor.clone()

    out = deliver_into(announced, bucket_bytes=64, place=place, into=lambda path: dest.get(path[0]))
    assert_state_dict_equal(out, sd)
    for key in ("big", "a", "scalar"):
        assert out[key] is dest[key] and dest[key].data_ptr() == pointers[key], key
    assert placed == ["wide", "strided"]
    assert not dest["wide"].any() and not dest["strided"].any()
    return sorted(out)


def broadcast_load_refused_before_any_tensor_moves(rank: int, world_size: int) -> str:
    """A model that cannot take rank 0's state dict on one rank: every rank
    raises the same error after the metadata alone, and no rank writes."""
    model, _ = make(seed=rank)
    if rank == 1:
        model.head = torch.nn.Linear(8, 15, bias=False)
    before = {k: v.clone() for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}
    full, _ = make(seed=7)
    sent = []
    broadcast = dist.broadcast

    def counting(*args, **kwargs):
        sent.append(args[0].numel())
        return broadcast(*args, **kwargs)

    dist.broadcast = counting  # the metadata's one message, then the tensor buckets
    try:
        opts = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
        sdtree.set_model_state_dict(model, full.state_dict() if rank == 0 else {}, options=opts)
    except sdtree.errors.IncompatibleStateDictError as err:
        message = str(err)
    else:
        message = "no error"
    finally:
        dist.broadcast = broadcast
    assert sent == [OBJECT_FIRST_BYTES], sent  # the metadata alone: no tensor moved
    assert_state_dict_equal({k: v for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}, before)
    return message


def deliver_failure_on_one_rank_is_raised_after_the_last_bucket(rank: int, world_size: int) -> str:
    """``place`` fails on rank 1 for the first bucket: rank 1 still takes part
    in every later bucket and raises at the end; rank 0 finishes; the group
    stays in step (a later collective agrees)."""
    from sdtree.transforms.distributed import announce

    sd = {f"t{i}": torch.full((8,), float(i)) for i in range(6)}  # 32 bytes each: 3 buckets of 2

    def place(path, tensor):
        if rank == 1 and path == ("t0",):
            raise ValueError("cannot place t0")
        return tensor.clone()

    try:
        out = announce(sd if rank == 0 else {}).deliver(bucket_bytes=128, place=place)
        outcome = "ok"
        assert_state_dict_equal(out, sd)
    except ValueError as err:
        outcome = str(err)
    check = torch.tensor([float(rank)])
    dist.all_reduce(check)
    assert check.item() == sum(range(world_size))
    return outcome


def broadcast_load_makes_one_metadata_broadcast(rank: int, world_size: int) -> dict:
    """A broadcast_from_rank0 load announces what rank 0 holds once: the model
    and the optimizers in one broadcast_object, then only tensor buckets."""
    trained, trained_optim = _wrap("ddp")
    train(trained, trained_optim, steps=2, seed=0)
    msd, osd = sdtree.get_state_dict(trained, trained_optim)
    if rank != 0:
        msd, osd = {}, {}
    opts = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
    model, optim = _wrap("ddp", seed=3 + rank)
    loads = {
        "set_state_dict": lambda: sdtree.set_state_dict(model, optim, model_state_dict=msd, optim_state_dict=osd, options=opts),
        "set_model_state_dict": lambda: sdtree.set_model_state_dict(model, msd, options=opts),
        "set_optimizer_state_dict": lambda: sdtree.set_optimizer_state_dict(model, optim, osd, options=opts),
    }
    from sdtree.transforms import broadcast as announcing

    original, original_list = announcing.broadcast_object, dist.broadcast_object_list
    calls: list = []

    def counting(*args, **kwargs):
        calls.append(args)
        return original(*args, **kwargs)

    def refused(*args, **kwargs):
        raise AssertionError("the metadata goes through sdtree's broadcast_object")

    counts = {}
    announcing.broadcast_object, dist.broadcast_object_list = counting, refused
    try:
        for name, load in loads.items():
            calls.clear()
            load()
            counts[name] = len(calls)
    finally:
        announcing.broadcast_object, dist.broadcast_object_list = original, original_list
    assert_state_dict_equal(model.state_dict(), trained.state_dict())
    assert_state_dict_equal(snapshot_optim(optim), snapshot_optim(trained_optim))
    return counts
