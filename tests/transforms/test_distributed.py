"""Collective transforms and torch-signature utilities, in 2 gloo workers."""

import pytest
import torch

from sdtree.transforms.distributed import _buckets, _row_counts
from tests.distributed import bodies_utils as bodies


def test_row_counts_follow_torch_chunk():
    for rows in range(0, 9):
        for world in (1, 2, 3, 4):
            expected = [c.shape[0] for c in torch.arange(rows).chunk(world)] if rows else []
            expected += [0] * (world - len(expected))
            assert _row_counts(rows, world) == tuple(expected), (rows, world)


def test_buckets_split_by_dtype_and_size():
    f, i = torch.float32, torch.int64
    specs = [("a", (2,), f), ("b", (2,), f), ("c", (100,), f), ("d", (1,), i), ("e", (1,), f)]
    assert [[k for k, _, _ in b] for b in _buckets(specs, 16)] == [["a", "b"], ["c"], ["d"], ["e"]]


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
