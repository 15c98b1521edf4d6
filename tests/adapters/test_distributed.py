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
