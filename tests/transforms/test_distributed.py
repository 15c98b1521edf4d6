"""Collective transforms and torch-signature utilities, in 2 gloo workers."""

import pytest
import torch

from sdtree._collectives import buckets, pack
from sdtree.transforms.sharding import row_counts
from tests.distributed import bodies_utils as bodies


def test_row_counts_follow_torch_chunk():
    for rows in range(0, 9):
        for world in (1, 2, 3, 4):
            expected = [c.shape[0] for c in torch.arange(rows).chunk(world)] if rows else []
            expected += [0] * (world - len(expected))
            assert row_counts(rows, world) == tuple(expected), (rows, world)


def test_buckets_split_by_dtype_and_size():
    f, i = torch.float32, torch.int64
    specs = [("a", (2,), f), ("b", (2,), f), ("c", (100,), f), ("d", (1,), i), ("e", (1,), f)]
    assert [[k for k, _, _ in b] for b in buckets(specs, 16)] == [["a", "b"], ["c"], ["d"], ["e"]]


@pytest.mark.parametrize(
    "shapes",
    [
        [(3, 4), (3, 4), (5, 4)],  # shapes that agree past dim 0: one concatenation along it
        [(3, 4), (4, 3), (12,)],  # they do not: flattened
        [(6,), (1,), (0,)],
        [(), (3,), ()],  # 0-d among 1-d
        [(2, 0), (3, 0)],  # nothing past dim 0
        [(2, 3, 2), (1, 3, 2)],
    ],
    ids=["same-tail", "mixed", "1d", "0d", "zero-tail", "3d"],
)
def test_pack_lays_tensors_side_by_side_flattened(shapes):
    g = torch.Generator().manual_seed(0)
    tensors = [torch.randn(shape, generator=g) for shape in shapes]
    expected = torch.cat([t.reshape(-1) for t in tensors])
    packed = pack(tensors, torch.device("cpu"), "test")
    assert packed.shape == expected.shape and torch.equal(packed, expected)
    # into the thread's scratch buffer, not new memory
    assert pack(tensors, torch.device("cpu"), "test").data_ptr() == packed.data_ptr()
    # one not contiguous, with a tail that agrees: its elements in logical order
    turned = [torch.randn(4, 3, generator=g).t(), torch.randn(3, 4, generator=g)]
    assert torch.equal(pack(turned, torch.device("cpu"), "test"), torch.cat([t.reshape(-1) for t in turned]))


def test_gather_state_dict_matches_torch(pool2):
    keys = pool2.run(bodies.gather_matches_torch)
    assert keys[0] == keys[1] and "uneven" in keys[0]


def test_distribute_state_dict_matches_torch(pool2):
    assert pool2.run(bodies.distribute_matches_torch) == ["ok", "ok"]


@pytest.mark.parametrize("strict", [False, True])
@pytest.mark.parametrize("cpu_offload", [False, True])
def test_broadcast_state_dict_matches_torch(strict, cpu_offload, pool2):
    keys = pool2.run(bodies.broadcast_matches_torch, strict, cpu_offload)
    assert keys[0] == keys[1]
    assert ("only_local" in keys[0]) != strict


def test_broadcast_places_each_tensor_as_its_bucket_arrives(pool2):
    counts = pool2.run(bodies.broadcast_places_shards_as_buckets_arrive)
    assert counts == [9, 9]


def test_cpu_copies_keep_dtensors_and_sharded_tensors(pool2):
    assert pool2.run(bodies.cpu_copies_keep_dtensors_and_sharded_tensors) == ["ok", "ok"]


def test_distribute_tensors_matches_torch(pool2):
    assert pool2.run(bodies.distribute_tensors_matches_torch) == ["ok", "ok"]


def test_collective_transforms_leave_their_inputs_untouched(pool2):
    """The collective half of property_tests/test_purity.py: DTensor inputs need a process group."""
    done = pool2.run(bodies.collective_transforms_leave_inputs_untouched)
    assert done[0] == done[1] and {"shard_like", "shard_as", "local_slice", "deliver"} <= set(done[0])
