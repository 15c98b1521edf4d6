"""FSDP2 and tensor parallel in 2 gloo workers, against torch and an unsharded ground truth."""

import warnings

import pytest

from tests.distributed import bodies_sharded as bodies

KINDS = ["fsdp2", "fsdp2_no_reshard", "tp"]


@pytest.mark.parametrize("kind", KINDS)
def test_get_state_dict_matches_torch_and_unsharded_truth(kind, pool2):
    assert pool2.run(bodies.get_matches_torch_and_truth, kind) == [["sharded", "full", "full_cpu", "flatten_full"]] * 2


@pytest.mark.parametrize("full", [False, True], ids=["sharded", "full"])
@pytest.mark.parametrize("kind", KINDS)
def test_round_trip_and_identical_training(kind, full, pool2):
    losses = pool2.run(bodies.round_trip, kind, full)
    assert losses[0] == losses[1]


@pytest.mark.parametrize("kind", KINDS)
def test_broadcast_from_rank0_into_sharded_model(kind, pool2):
    assert pool2.run(bodies.broadcast_into_sharded, kind) == ["ok", "ok"]


@pytest.mark.parametrize(
    "fault,bad_rank", [("missing", 1), ("shape", 1), ("dtype", 0)], ids=["missing-key", "wrong-shape", "wrong-dtype"]
)
def test_bad_input_on_one_rank_fails_every_rank_the_same_way(fault, bad_rank, pool2):
    messages = pool2.run(bodies.bad_input_on_one_rank, "fsdp2", fault, bad_rank, timeout=60)
    assert messages[0] == messages[1]
    assert f"rank(s) {bad_rank} of 2 cannot load; nothing was written on any rank" in messages[0]
    assert "head.weight" in messages[0]


@pytest.mark.parametrize("kind", ["fsdp2", "tp"])
def test_dcp_checkpoint_reshards_to_world_size_1_and_4(kind, pool2, pool4, tmp_path):
    import torch.distributed.checkpoint as dcp

    import sdtree
    from sdtree.testing import assert_state_dict_equal
    from tests.adapters.models import make

    path = str(tmp_path / "ckpt")
    saved = pool2.run(bodies.dcp_save, kind, path)[0]
    # world size 1: this process, unsharded
    model, optim = make(seed=7)
    msd, osd = sdtree.get_state_dict(model, optim)
    state = {"model": msd, "optim": osd}
    with warnings.catch_warnings():  # torch warns about no_dist even when asked for it
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(state, checkpoint_id=path, no_dist=True)
    sdtree.set_state_dict(model, optim, model_state_dict=state["model"], optim_state_dict=state["optim"])
    assert_state_dict_equal(sdtree.get_state_dict(model, optim), saved)
    # world size 4
    loaded = pool4.run(bodies.dcp_load, kind, path)[0]
    assert_state_dict_equal(loaded, saved)


@pytest.mark.parametrize("kind", ["hsdp", "fsdp2_tp"])
def test_two_dimensional_meshes_at_world_size_4(kind, pool4):
    assert pool4.run(bodies.get_matches_torch_and_truth, kind) == [["sharded", "full", "full_cpu", "flatten_full"]] * 4
    for full in (False, True):
        losses = pool4.run(bodies.round_trip, kind, full)
        assert len(set(map(tuple, losses))) == 1
    assert pool4.run(bodies.broadcast_into_sharded, kind) == ["ok"] * 4
