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
    # a bucket of tensors of one shape (viewed out of it in one call), and
    # of other shapes with the same shard length (12 elements a rank)
    g = torch.Generator().manual_seed(1)
    shapes = [(4, 6), (4, 6), (6, 4), (4, 6), (12, 2), (24,), (2, 3, 4)]
    shaped = {f"t{i}": torch.randn(shape, generator=g) for i, shape in enumerate(shapes)}
    shards = {k: distribute_tensor(v, mesh, [Shard(0)]) for k, v in shaped.items()}
    for bucket in (16, 1 << 20):
        gathered = gather_dtensors(bucket_bytes=bucket)(shards)
        assert_state_dict_equal(gathered, shaped)
        assert all(gathered[k].is_contiguous() for k in shaped)
    assert_state_dict_equal(sdtree.gather_state_dict(shards), torch_utils._gather_state_dict(shards))
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


def _sharded_tensor(rank: int, rows: torch.Tensor):
    """A legacy ShardedTensor holding this rank's half of ``rows`` (dim-0 chunks)."""
    from torch.distributed._shard.sharded_tensor import Shard as LocalShard
    from torch.distributed._shard.sharded_tensor import init_from_local_shards
    from torch.distributed._shard.sharded_tensor.metadata import ShardMetadata

    half = rows.shape[0] // 2
    local = rows[rank * half : (rank + 1) * half].clone()
    meta = ShardMetadata([rank * half, 0], [half, rows.shape[1]], f"rank:{rank}/cpu")
    return init_from_local_shards([LocalShard(local, meta)], *rows.shape)


def _storage(tensor: torch.Tensor) -> int:
    return tensor.untyped_storage().data_ptr()


def cpu_copies_keep_dtensors_and_sharded_tensors(rank: int, world_size: int) -> str:
    """create_cpu_state_dict / copy_state_dict keep each DTensor a DTensor and
    each ShardedTensor a ShardedTensor, as torch's do (the base of async staging)."""
    from torch.distributed._shard.sharded_tensor import ShardedTensor

    from sdtree.errors import StructureMismatchError

    mesh = init_device_mesh("cpu", (world_size,))
    full, sharded = _sharded(mesh)
    sharded["dscalar"] = distribute_tensor(torch.tensor(3.0), mesh, [Replicate()])
    sharded["st"] = _sharded_tensor(rank, torch.arange(12.0).reshape(4, 3))
    sharded["nested"] = {"plain": torch.arange(5.0), "n": 3, "list": [1, 2]}
    for kwargs in ({}, {"share_memory": True}, {"pin_memory": True}):
        ours = sdtree.create_cpu_state_dict(sharded, **kwargs)
        # torch's raises for pin_memory without an accelerator; sdtree's pins only where CUDA is
        torch_kwargs = kwargs if torch.cuda.is_available() else {k: v for k, v in kwargs.items() if k != "pin_memory"}
        theirs = torch_utils._create_cpu_state_dict(sharded, **torch_kwargs)
        assert list(ours) == list(theirs) and sdtree.check_state_dict_similarity(sharded, ours)
        for key, value in sharded.items():
            a, b = ours[key], theirs[key]
            assert type(a) is type(b), (key, type(a), type(b))
            if isinstance(value, DTensor):
                assert (a.device_mesh, a.placements, a.shape, a.stride(), a.dtype) == (
                    value.device_mesh, value.placements, value.shape, value.stride(), value.dtype
                ), key
                if value.dim() == 0:
                    assert a is value and b is value, key  # torch shares 0-dim DTensors
                    continue
                local = a._local_tensor
                assert local.is_cpu and local.shape == value._local_tensor.shape, key
                assert local.numel() == 0 or _storage(local) != _storage(value._local_tensor), key
                assert local.is_shared() == bool(kwargs.get("share_memory")), key
            elif isinstance(value, ShardedTensor):
                assert a.metadata() == value.metadata() and a._process_group is value._process_group
                (mine,), (source,) = a.local_shards(), value.local_shards()
                assert mine.metadata == source.metadata and mine.tensor.shape == source.tensor.shape
                assert _storage(mine.tensor) != _storage(source.tensor)
        copied = sdtree.copy_state_dict(sharded, ours)
        torch_utils._copy_state_dict(sharded, theirs)
        for key, value in sharded.items():
            assert copied[key] is ours[key] or not isinstance(value, torch.Tensor), key
        for got in (copied, theirs):
            for key in ("even", "uneven", "cols", "replicated", "empty_rows", "bf16"):
                assert isinstance(got[key], DTensor) and torch.equal(got[key].to_local(), sharded[key].to_local()), key
                assert torch.equal(got[key].full_tensor(), full[key]), key
            assert torch.equal(got["st"].local_shards()[0].tensor, sharded["st"].local_shards()[0].tensor)
            assert torch.equal(got["nested"]["plain"], torch.arange(5.0)) and got["nested"]["n"] == 3
    # the mirror follows the source each time it is copied into (async staging)
    mirror = sdtree.create_cpu_state_dict(sharded)
    for step in range(2):
        sharded["even"]._local_tensor.add_(1)
        sharded["st"].local_shards()[0].tensor.mul_(2)
        sdtree.copy_state_dict(sharded, mirror)
        assert torch.equal(mirror["even"].full_tensor(), sharded["even"].full_tensor())
        assert torch.equal(mirror["st"].local_shards()[0].tensor, sharded["st"].local_shards()[0].tensor)
    # a DTensor never lands in a plain tensor, nor a plain tensor in a DTensor; nothing is written
    wrong = {**mirror, "even": torch.zeros(sharded["even"].shape), "plain_into_dtensor": None}
    wrong.pop("plain_into_dtensor")
    before = mirror["uneven"].to_local().clone()
    sharded["uneven"]._local_tensor.add_(1)
    try:
        sdtree.copy_state_dict(sharded, wrong)
    except StructureMismatchError as err:
        assert "['even']: DTensor[Shard(dim=0)](4, 3) torch.float32 with local [(2, 3)] vs tensor(4, 3)" in str(err), err
    else:
        raise AssertionError("a DTensor copied into a plain tensor")
    assert torch.equal(mirror["uneven"].to_local(), before)  # validated before the first write
    return "ok"


def distribute_tensors_matches_torch(rank: int, world_size: int) -> str:
    from sdtree.errors import StructureMismatchError

    mesh = init_device_mesh("cpu", (world_size,))
    g = torch.Generator().manual_seed(1)
    fulls = {"even": torch.randn(world_size, 2, generator=g), "uneven": torch.randn(1, 2, generator=g), "cols": torch.randn(3, 4, generator=g)}
    placements = {"even": [Shard(0)], "uneven": [Shard(0)], "cols": [Shard(1)]}
    for meta in (False, True):
        def local_state_dict():
            out = {}
            for key, full in fulls.items():
                # the DTensor and the tensor differ before the call
                dt = distribute_tensor(torch.randn(full.shape, generator=torch.Generator().manual_seed(7)), mesh, placements[key])
                if meta:
                    dt = DTensor.from_local(torch.empty_like(dt.to_local(), device="meta"), mesh, dt.placements, shape=dt.shape, stride=dt.stride())
                out[key] = [dt, full]
            out["plain"], out["none"] = torch.ones(2), None
            return out

        ours, theirs = local_state_dict(), local_state_dict()
        dtensors = {k: v[0] for k, v in ours.items() if isinstance(v, list)}
        keys = ["even", "uneven", "cols", "plain", "none", "absent"]
        sdtree.distribute_tensors(ours, keys, "cpu")
        torch_utils._distribute_tensors(theirs, keys, "cpu")
        assert list(ours) == list(theirs)
        for key, full in fulls.items():
            a, b = ours[key], theirs[key]
            assert isinstance(a, DTensor) and a.size() == b.size() and a.stride() == b.stride(), key
            assert a.placements == b.placements and torch.equal(a.to_local(), b.to_local()), key
            assert torch.equal(a.full_tensor(), full), key
            assert (a is dtensors[key]) != meta, key  # written into the shard unless it is meta
        assert torch.equal(ours["plain"], torch.ones(2)) and ours["none"] is None
    # every pair is checked before the first is written
    bad = {"even": [distribute_tensor(torch.zeros(world_size, 2), mesh, [Shard(0)]), torch.ones(world_size, 2)],
           "wrong": [distribute_tensor(torch.zeros(4, 2), mesh, [Shard(0)]), torch.ones(3, 2)]}
    try:
        sdtree.distribute_tensors(bad, ["even", "wrong"], "cpu")
    except StructureMismatchError as err:
        assert "'wrong': full tensor (3, 2) vs DTensor (4, 2)" in str(err) and "Nothing was written" in str(err)
    else:
        raise AssertionError("a full tensor of another shape was distributed")
    assert isinstance(bad["even"], list) and not bad["even"][0].to_local().any()
    try:
        sdtree.distribute_tensors({"k": (torch.ones(1), torch.ones(1))}, ["k"], "cpu")
    except TypeError as err:
        assert "local_state_dict['k'] must be a (local DTensor, full tensor) pair" in str(err) and "a tuple of Tensor, Tensor" in str(err)
    else:
        raise AssertionError("a pair without a DTensor was accepted")
    return "ok"


def collective_transforms_leave_inputs_untouched(rank: int, world_size: int) -> list[str]:
    """Every collective transform, on DTensors and full tensors: what it is
    given (state dicts, templates, the local tensors under the DTensors)
    comes back as it was, versions and values included."""
    from property_tests.snapshot import assert_unchanged, snapshot
    from sdtree.transforms import broadcast, gather, sharding

    mesh = init_device_mesh("cpu", (world_size,))
    full, sharded = _sharded(mesh)
    templates = {k: v for k, v in sharded.items() if isinstance(v, DTensor)}
    locals_ = {k: v._local_tensor for k, v in templates.items()}
    nested = {"model": sharded, "n": 3}
    calls = {
        "gather_dtensors": (gather.gather_dtensors(bucket_bytes=64), (sharded,)),
        "gather_dtensors nested": (gather.gather_dtensors(cpu_offload=True), (nested,)),
        "gather_state_dict": (lambda sd: sdtree.gather_state_dict(sd, cpu_offload=True, ranks_only=(1,)), (sharded,)),
        "keep_on_ranks": (gather.keep_on_ranks((1,)), (sharded,)),
        "shard_like": (sharding.shard_like(templates), (full,)),
        "shard_as": (lambda f: {k: sharding.shard_as(f[k], t) for k, t in templates.items()}, (full,)),
        "local_slice": (lambda f: {k: sharding.local_slice(f[k], t) for k, t in templates.items()}, (full,)),
        "broadcast_from_rank0": (broadcast.broadcast_from_rank0(bucket_bytes=64), (full,)),
        "broadcast_from_rank0 place": (
            broadcast.broadcast_from_rank0(place=lambda p, t: sharding.shard_as(t, templates[p[0]]) if p[0] in templates else t),
            (full,),
        ),
        "announce": (lambda f: broadcast.announce(f, sharded).placeholders(), (full,)),
        "deliver": (lambda f: broadcast.announce(f, {"full": f, "n": 3}).deliver(bucket_bytes=64), (full,)),
        "offload_to_cpu": (sdtree.transforms.offload_to_cpu(), (sharded,)),
        "create_cpu_state_dict": (sdtree.create_cpu_state_dict, (sharded,)),
    }
    done = []
    for name, (fn, args) in calls.items():
        watched = (*args, templates, locals_)
        before = [snapshot(arg) for arg in watched]
        fn(*args)
        for old, arg in zip(before, watched):
            assert_unchanged(old, arg)
        done.append(name)
    dist.barrier()
    return done
