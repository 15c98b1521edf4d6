"""FSDP1 (``FullyShardedDataParallel``) in 2 gloo workers, against torch and an unsharded ground truth."""

import pytest

from tests.distributed import bodies_fsdp1 as bodies

ORIG = pytest.mark.parametrize("orig", [False, True], ids=["flat", "use_orig_params"])
OPTIONS = ["sharded", "full", "full_cpu", "flatten_full", "sharded_cpu"]


@ORIG
def test_get_state_dict_matches_torch_and_unsharded_truth(orig, pool2):
    assert pool2.run(bodies.get_matches_torch_and_truth, orig) == [OPTIONS] * 2


@pytest.mark.parametrize(
    "full,flatten", [(False, False), (True, False), (True, True)], ids=["sharded", "full", "full-flattened"]
)
@ORIG
def test_round_trip_and_identical_training(orig, full, flatten, pool2):
    losses = pool2.run(bodies.round_trip, orig, full, flatten)
    assert losses[0] == losses[1]


@pytest.mark.parametrize("broadcast", [False, True], ids=["every-rank", "broadcast_from_rank0"])
@ORIG
def test_unsharded_checkpoint_loads_and_trains_like_the_unsharded_model(orig, broadcast, pool2):
    assert pool2.run(bodies.load_unsharded_truth, orig, broadcast) == ["ok", "ok"]


def test_frozen_and_trainable_parameters_in_one_flat_parameter(pool2):
    assert pool2.run(bodies.frozen_in_flat_parameter) == ["ok", "ok"]


@ORIG
def test_get_reports_initial_optimizer_state_without_stepping(orig, pool2):
    assert pool2.run(bodies.get_does_not_step, orig) == ["ok", "ok"]


@pytest.mark.parametrize(
    "orig,fault,bad_rank,names",
    [
        (False, "missing", 1, "Missing key(s) in state_dict: 'head.weight'"),
        (True, "shape", 0, "'head.weight': expected shape (16, 8), found (3, 3)"),
        (False, "dtype", 1, "'head.weight': expected dtype torch.float32 (or another float dtype), found torch.int64"),
        (True, "optim_shape", 0, "state of 'head.weight': 'momentum_buffer': expected shape (16, 8), found (2,)"),
    ],
    ids=["missing-key", "wrong-shape", "wrong-dtype", "wrong-optimizer-shape"],
)
def test_bad_input_on_one_rank_fails_every_rank_the_same_way(orig, fault, bad_rank, names, pool2):
    messages = pool2.run(bodies.bad_input_on_one_rank, orig, fault, bad_rank, timeout=60)
    assert messages[0] == messages[1]
    assert f"rank(s) {bad_rank} of 2 cannot load; nothing was written on any rank" in messages[0]
    assert names in messages[0]


@ORIG
def test_sharded_optimizer_state_through_dcp(orig, pool2, tmp_path):
    assert pool2.run(bodies.dcp_round_trip, orig, str(tmp_path / "ckpt")) == ["ok", "ok"]


def test_gather_sharded_tensors(pool2):
    assert pool2.run(bodies.gather_sharded_tensors) == ["ok", "ok"]
