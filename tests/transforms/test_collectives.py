"""gather_into, and broadcasts received in place or scattered (issue 14), in 2 gloo workers."""

import pytest

from sdtree._collectives import OBJECT_FIRST_BYTES

from tests.distributed import bodies_collectives as bodies


def test_gather_into_writes_the_destination_in_place(pool2):
    keys = pool2.run(bodies.gather_into_writes_the_destination)
    assert keys[0] == keys[1] and {"big_even", "big_uneven", "legacy", "cols"} <= set(keys[0])


def test_gather_into_raises_on_every_rank_naming_the_key(pool2):
    messages = pool2.run(bodies.gather_into_checks_on_every_rank)
    for per_rank in messages:
        assert len(per_rank) == 4
        assert "rank 1 of 2" in per_rank[0] and "['uneven']" in per_rank[0] and "(5, 3)" in per_rank[0]
        assert "['even']" in per_rank[1] and "torch.float64" in per_rank[1]
        assert "['ints']" in per_rank[2] and "NoneType" in per_rank[2]
        assert "missing" in per_rank[3]


def test_big_tensors_are_sent_and_received_in_place(pool2):
    keys = pool2.run(bodies.big_tensors_are_received_in_place)
    assert keys[0] == keys[1] and "big_bf16" in keys[0]


def test_broadcast_mixes_sizes_and_dtypes_exactly(pool2):
    assert pool2.run(bodies.broadcast_from_rank0_mixes_sizes_and_dtypes) == [40, 40]


@pytest.mark.parametrize("meta", [False, True])
def test_broadcast_into_shards_scatters_rows(meta, pool2):
    sender, counted = pool2.run(bodies.broadcast_scatters_shards, meta)
    assert sender["received"] == 0  # rank 0 keeps its own rows
    # rank 1 receives its rows of the big tensors (+ the small ones, the metadata), not the whole
    # (the metadata travels in one message of OBJECT_FIRST_BYTES)
    assert counted["shards"] <= counted["received"] < counted["shards"] + OBJECT_FIRST_BYTES + 16 * 1024, counted
    assert counted["received"] - OBJECT_FIRST_BYTES < 0.51 * counted["whole"]


def test_fsdp2_broadcast_load_receives_its_shards(pool2):
    counted = pool2.run(bodies.fsdp2_broadcast_load_scatters)[1]
    assert counted["received"] - OBJECT_FIRST_BYTES < 0.52 * counted["whole"], counted  # the metadata: one message


def test_a_bad_input_on_rank0_raises_on_every_rank(pool2):
    for messages in pool2.run(bodies.bad_input_on_rank0_raises_everywhere, timeout=60):
        assert messages[0].startswith("list: NotAMappingError") and "expected a state dict" in messages[0]
        assert messages[1].startswith("meta: UnsupportedLeafError") and "meta tensors" in messages[1]
        assert messages[2].startswith("dtensor: UnsupportedLeafError") and "DTensors" in messages[2]
        assert messages[3].startswith("sharded: NotAMappingError") and "ShardedTensors" in messages[3]
        assert messages[4].startswith("unpicklable: TypeError: broadcast of a dict failed to pickle on rank 0")


def test_broadcast_object_sends_any_size_in_one_collective_or_two(pool2):
    for results in pool2.run(bodies.broadcast_object_of_any_size, timeout=60):
        # equal on every rank; one collective while the pickle fits the first message
        assert results[:5] == [(True, 1), (True, 1), (True, 2), (True, 1), (True, 1)]
        assert results[5].startswith("broadcast of a function failed to pickle on rank 0")


def test_a_gather_plan_gathers_again_into_its_destination(pool2):
    per_rank = pool2.run(bodies.gather_plan_gathers_again_into_its_destination)
    for kinds in per_rank:
        assert kinds[:3] == ["any", "bucket", "leaf"]
        assert "not of the layout the plan was made for" in kinds[3]
