"""Bodies for gather_into and the in-place, scattering broadcasts (issue 14)."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Shard, distribute_tensor

from sdtree.errors import StructureMismatchError
from sdtree.transforms.gather import GatherPlan, gather_into
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




class _Received:
    """Counts the tensor bytes this rank receives (broadcasts it does not
    send, scatters), and the buffers the collectives use, while active."""

    def __init__(self, rank: int):
        self.rank, self.bytes, self.buffers = rank, 0, []

    def __enter__(self):
        self.saved = dist.broadcast, dist.scatter

        def broadcast(tensor, *args, **kwargs):
            if self.rank != 0:
                self.bytes += tensor.numel() * tensor.element_size()
            self.buffers.append(tensor)
            return self.saved[0](tensor, *args, **kwargs)

        def scatter(tensor, *args, **kwargs):
            if self.rank != 0:  # rank 0 keeps its own rows: nothing on the wire
                self.bytes += tensor.numel() * tensor.element_size()
            self.buffers.append(tensor)
            return self.saved[1](tensor, *args, **kwargs)

        dist.broadcast, dist.scatter = broadcast, scatter
        return self

    def __exit__(self, *exc):
        dist.broadcast, dist.scatter = self.saved


def _mixed(seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {
        "big": torch.randn(96, 64, generator=g),  # 24 KiB: alone
        "small": torch.randn(3, generator=g),
        "big_bf16": torch.randn(100, 50, generator=g).to(torch.bfloat16),  # 10,000 bytes: alone
        "ints": torch.arange(5),
        "flags": torch.tensor([True, False, True]),
        "big_ints": torch.arange(5000),
        "half": torch.randn(7, generator=g).half(),
        "scalar": torch.tensor(1.5),
        "empty": torch.zeros(0, 3),
        "n": 4,
    }


def big_tensors_are_received_in_place(rank: int, world_size: int) -> list[str]:
    """A tensor that travels alone: rank 0 sends its own tensor, rank 1
    receives into its destination (no pack, no unpack); small ones in
    buckets; every dtype arrives exact."""
    from sdtree.state_dict_utils import deliver_into
    from sdtree.testing import assert_state_dict_equal
    from sdtree.transforms.broadcast import announce

    sd = _mixed()
    dest = {k: torch.zeros_like(v) for k, v in sd.items() if isinstance(v, torch.Tensor)}
    ptrs = {k: v.data_ptr() for k, v in dest.items()}
    announced = announce(sd if rank == 0 else {})
    with _Received(rank) as seen:
        out = deliver_into(announced, into=lambda path: dest.get(path[0]), bucket_bytes=16 * 1024)
    assert_state_dict_equal(out, sd)
    for key in dest:
        assert out[key] is dest[key] and dest[key].data_ptr() == ptrs[key], key
    sent = {t.data_ptr() for t in seen.buffers}
    mine = sd if rank == 0 else dest
    alone = ("big", "big_bf16", "big_ints")  # at least bucket_bytes / 2
    assert all(mine[k].data_ptr() in sent for k in alone), "a tensor alone is sent and received as it is"
    # and the small ones in 5 buckets, one per run of one dtype:
    # small | ints | flags | half | scalar, empty
    assert len(seen.buffers) == len(alone) + 5
    return sorted(out)


def broadcast_from_rank0_mixes_sizes_and_dtypes(rank: int, world_size: int) -> int:
    from sdtree.testing import assert_state_dict_equal
    from sdtree.transforms.broadcast import broadcast_from_rank0

    total = 0
    for bucket in (64, 16 * 1024, 1 << 24):
        sd = _mixed(bucket)
        out = broadcast_from_rank0(bucket_bytes=bucket)(sd if rank == 0 else {})
        assert_state_dict_equal(out, sd)
        total += len(out)
    # buckets of one shape (viewed out of the bucket in one call) and of several
    g = torch.Generator().manual_seed(3)
    for shapes in ([(3, 4)] * 3, [(2, 2, 3)] * 2 + [(3, 4), (12,)], [()] * 3):
        sd = {f"t{i}": torch.randn(shape, generator=g) for i, shape in enumerate(shapes)}
        out = broadcast_from_rank0()(sd if rank == 0 else {})
        assert_state_dict_equal(out, sd)
        total += len(out)
    return total


def _rows(full: torch.Tensor, rank: int, world_size: int) -> torch.Tensor:
    return full.chunk(world_size)[rank] if rank < len(full.chunk(world_size)) else full[:0]


def broadcast_scatters_shards(rank: int, world_size: int, meta: bool) -> dict:
    """broadcast_state_dict into FSDP2-laid-out DTensors: each rank receives
    its rows only (uneven counts too), straight into its local shard."""
    import sdtree

    mesh = init_device_mesh("cpu", (world_size,))
    g = torch.Generator().manual_seed(0)
    full = {
        "uneven": torch.randn(1025, 256, generator=g),  # just over 1 MiB: alone, scattered
        "even": torch.randn(2048, 128, generator=g),
        "small": torch.randn(5, 3, generator=g),  # in a bucket, cut to its rows
        "plain": torch.randn(4, generator=g),
        "n": 1,
    }
    local = {k: distribute_tensor(torch.zeros_like(v), mesh, [Shard(0)]) for k, v in full.items() if k not in ("plain", "n")}
    if meta:
        local = {k: DTensor.from_local(torch.empty_like(v.to_local(), device="meta"), mesh, [Shard(0)], shape=v.shape, stride=v.stride()) for k, v in local.items()}
    ptrs = {k: v._local_tensor.data_ptr() for k, v in local.items()}
    given = dict(local)
    with _Received(rank) as seen:
        sdtree.broadcast_state_dict(full if rank == 0 else {}, given, torch.device("cpu"))
    for key, value in given.items():
        if key in ("plain", "n"):
            assert (torch.equal(value, full[key]) if key == "plain" else value == full[key]), key
            continue
        assert isinstance(value, DTensor) and value.placements == (Shard(0),), key
        assert torch.equal(value.to_local(), _rows(full[key], rank, world_size)), key
        assert torch.equal(value.full_tensor(), full[key]), key
        if not meta:
            assert value is local[key] and value._local_tensor.data_ptr() == ptrs[key], key
    shards = sum(_rows(full[k], rank, world_size).numel() * 4 for k in ("uneven", "even"))
    return {"received": seen.bytes, "shards": shards, "whole": sum(full[k].numel() * 4 for k in ("uneven", "even"))}


def fsdp2_broadcast_load_scatters(rank: int, world_size: int) -> dict:
    """set_model_state_dict(full_state_dict, broadcast_from_rank0) into an
    FSDP2 model: each rank receives its rows of each big parameter, and
    the parameters are written in place."""
    import sdtree
    from torch import nn
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (world_size,))
    torch.manual_seed(0)
    source = nn.Sequential(nn.Linear(256, 1025), nn.Linear(1025, 512))
    full = {k: v.detach().clone() for k, v in source.state_dict().items()}
    torch.manual_seed(1 + rank)
    model = nn.Sequential(nn.Linear(256, 1025), nn.Linear(1025, 512))
    for layer in model:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    ptrs = {k: p._local_tensor.data_ptr() for k, p in model.named_parameters()}
    opts = sdtree.StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
    with _Received(rank) as seen:
        sdtree.set_model_state_dict(model, full if rank == 0 else {}, options=opts)
    for key, param in model.named_parameters():
        assert torch.equal(param.full_tensor(), full[key]), key
        assert param._local_tensor.data_ptr() == ptrs[key], key
    whole = sum(v.numel() * 4 for v in full.values())
    return {"received": seen.bytes, "whole": whole}


def bad_input_on_rank0_raises_everywhere(rank: int, world_size: int) -> list[str]:
    """What rank 0 cannot send raises the same error on every rank after
    the metadata alone; the group stays in step."""
    from sdtree.errors import NotAMappingError, UnsupportedLeafError
    from sdtree.transforms.broadcast import broadcast_from_rank0

    mesh = init_device_mesh("cpu", (world_size,))
    bad = {
        "list": [torch.ones(2)],
        "meta": {"w": torch.ones(2), "m": torch.empty(4, device="meta")},
        "dtensor": {"d": distribute_tensor(torch.ones(4, 2), mesh, [Shard(0)])},
        "sharded": {"s": _sharded_tensor(rank, torch.ones(4, 2))},
        "unpicklable": {"w": torch.ones(2), "f": lambda: 0},
    }
    messages = []
    for name, sd in bad.items():
        try:
            broadcast_from_rank0(bucket_bytes=64)(sd if rank == 0 else {})
        except (NotAMappingError, UnsupportedLeafError, TypeError) as err:
            messages.append(f"{name}: {type(err).__name__}: {err}")
        else:
            messages.append(f"{name}: no error")
        check = torch.tensor([1.0])
        dist.all_reduce(check)
        assert check.item() == world_size
    return messages


def gather_plan_gathers_again_into_its_destination(rank: int, world_size: int) -> list[str]:
    """One GatherPlan, called again with new values of its layout (as the
    Stager calls it): every destination holds the new full tensor, in place;
    bucketed tensors take the packed path; a layout it was not made for raises."""
    mesh = init_device_mesh("cpu", (world_size,))

    def case(seed):  # with a family of evenly split float64 tensors: a bucket of their own
        full, sharded = _gather_case(mesh, rank, seed)
        g = torch.Generator().manual_seed(seed)
        even = {f"f64_{n}": torch.randn(2 * n, n + 1, generator=g, dtype=torch.float64) for n in (1, 2, 3)}
        return {**full, **even}, {**sharded, **{k: distribute_tensor(v, mesh, [Shard(0)]) for k, v in even.items()}}

    full, sharded = case(0)
    keys = [k for k, v in sharded.items() if isinstance(v, DTensor) or type(v).__name__ == "ShardedTensor"]
    dest = [torch.full_like(full[k], -1.0) for k in keys]
    ptrs = [t.data_ptr() for t in dest]
    plan = GatherPlan([sharded[k] for k in keys], list(dest), bucket_bytes=1 << 20)
    kinds = sorted({job[0] for job in plan._jobs})
    for seed in (1, 2, 3):
        full, sharded = case(seed)
        leaves = [sharded[k] for k in keys]
        plan(leaves)
        for key, out, leaf, ptr in zip(keys, dest, leaves, ptrs):
            assert leaf is out and out.data_ptr() == ptr, key
            assert torch.equal(out, full[key]), (key, seed)
    wrong = {k: distribute_tensor(torch.zeros(8, 3), mesh, [Shard(0)]) if k == "even" else v for k, v in sharded.items()}
    try:
        plan([wrong[k] for k in keys])
    except StructureMismatchError as err:
        kinds.append(str(err))
    dist.barrier()
    return kinds


def broadcast_object_of_any_size(rank: int, world_size: int) -> list:
    """broadcast_object: small and large pickles (one collective, or two),
    from either rank, and an unpicklable object failing on every rank."""
    from sdtree._collectives import OBJECT_FIRST_BYTES, broadcast_object

    counted = []
    saved = dist.broadcast

    def broadcast(tensor, *args, **kwargs):
        counted.append(tensor.numel())
        return saved(tensor, *args, **kwargs)

    dist.broadcast = broadcast
    out = []
    try:
        big = list(range(OBJECT_FIRST_BYTES))  # pickles to more than the first message
        exact = b"x" * (OBJECT_FIRST_BYTES - 8 - 64)
        for src, obj in ((0, {"a": 1}), (1, ("from", 1)), (0, big), (1, exact), (0, None)):
            counted.clear()
            got = broadcast_object(obj if rank == src else "ignored", src=src)
            out.append((got == obj, len(counted)))
        try:
            broadcast_object((lambda: 0) if rank == 0 else None)  # unpicklable on the sender only
        except TypeError as err:
            out.append(str(err))
        else:
            out.append("no error")
    finally:
        dist.broadcast = saved
    check = torch.tensor([1.0])
    dist.all_reduce(check)  # the group is still in step
    return out
