"""sdtree.Stager over DTensors, ShardedTensors and FSDP2, in 2 gloo workers."""

from tests.distributed import bodies_staging as bodies


def test_mirror_keeps_dtensors_and_sharded_tensors(pool2):
    assert pool2.run(bodies.mirror_keeps_dtensors_and_sharded_tensors) == ["ok", "ok"]


def test_fsdp2_state_dicts_staged_for_async_save_load_back_as_staged(pool2, tmp_path):
    assert pool2.run(bodies.fsdp2_async_save_round_trip, str(tmp_path)) == ["ok", "ok"]


def test_full_state_dict_gathers_into_the_mirrors_buffers(pool2):
    keys = pool2.run(bodies.full_state_dict_gathers_into_the_mirror)
    assert keys[0] == keys[1] and {"even", "uneven", "cols", "st"} <= set(keys[0])
