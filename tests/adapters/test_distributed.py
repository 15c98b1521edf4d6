"""DDP and composable replicate in 2 spawned gloo processes (one pool for the session)."""

import pytest

from tests.distributed import bodies_replicated as bodies


@pytest.mark.parametrize("kind", ["ddp", "replicate"])
def test_get_state_dict_matches_torch_under(kind, pool2):
    assert pool2.run(bodies.matches_torch, kind) == [["default", "flatten", "full_cpu", "cpu"]] * 2


@pytest.mark.parametrize("kind", ["ddp", "replicate"])
def test_round_trip_and_identical_training_under(kind, pool2):
    losses = pool2.run(bodies.round_trip, kind)
    assert len(losses) == 2 and all(len(l) == 2 for l in losses)


def test_offload_state_dict_to_cpu_keeps_result_on_ranks_only(pool2):
    assert pool2.run(bodies.offload_ranks_only) == [0, 2]


@pytest.mark.parametrize("kind", ["ddp", "replicate"])
def test_broadcast_from_rank0_loads_every_rank_like_torch(kind, pool2):
    assert pool2.run(bodies.broadcast_load, kind) == ["ok", "ok"]


def test_broadcast_with_empty_rank0_raises_the_same_error_everywhere(pool2):
    messages = pool2.run(bodies.broadcast_rank0_empty)
    assert messages[0] == messages[1]
    assert "rank 0 passed an empty state dict" in messages[0]


def test_broadcast_transform_keeps_structure_and_dtypes(pool2):
    assert pool2.run(bodies.broadcast_transform) == [["7", "a", "b", "c", "d"]] * 2


def test_broadcast_of_a_flat_state_dict_keeps_its_type_order_and_rank0_tensors(pool2):
    keys = ["w", "step", "lr", "note", "half", "5", "scalar"]
    assert pool2.run(bodies.broadcast_flat_state_dict) == [keys] * 2


def test_announce_then_deliver_writes_into_fitting_destinations(pool2):
    assert pool2.run(bodies.announce_then_deliver_into_destinations) == [["a", "big", "n", "scalar", "strided", "wide"]] * 2


def test_broadcast_load_is_refused_on_every_rank_before_any_tensor_moves(pool2):
    messages = pool2.run(bodies.broadcast_load_refused_before_any_tensor_moves, timeout=60)
    assert messages[0] == messages[1]
    assert "rank(s) 1 of 2 cannot load; nothing was written on any rank" in messages[0]
    assert "'head.weight': expected shape (15, 8), found (16, 8)" in messages[0]


def test_a_failure_while_landing_on_one_rank_does_not_hang_the_others(pool2):
    outcomes = pool2.run(bodies.deliver_failure_on_one_rank_is_raised_after_the_last_bucket, timeout=60)
    assert outcomes == ["ok", "cannot place t0"]


def test_a_broadcast_load_makes_one_metadata_broadcast(pool2):
    once = {"set_state_dict": 1, "set_model_state_dict": 1, "set_optimizer_state_dict": 1}
    assert pool2.run(bodies.broadcast_load_makes_one_metadata_broadcast) == [once, once]
