"""DCP checkpoints saved collectively from two gloo ranks, loaded at any world size."""

from pathlib import Path

import torch
from torch.distributed.checkpoint import FileSystemReader

from sdtree.checkpoint import convert, load
from sdtree.testing import assert_state_dict_equal
from tests.checkpoint import bodies


def test_sharded_save_consolidates_and_reshards(pool2, tmp_path):
    path = str(tmp_path / "ckpt")
    files = pool2.run(bodies.sharded_save, path)
    assert files[0] == files[1] and {".metadata", "__0_0.distcp", "__1_0.distcp"} <= set(files[0])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
    assert FileSystemReader(path).read_metadata().storage_meta.checkpoint_id == Path(path)  # not the temporary name
    # world size 1: one process reads both shards, straight into place where a
    # chunk is a contiguous slice (rows), through torch's reader where not (columns)
    assert_state_dict_equal(load(path), bodies.full_state())
    convert(path, tmp_path / "one.pt")
    assert_state_dict_equal(torch.load(tmp_path / "one.pt", weights_only=True), bodies.full_state())
    # world size 2: each rank reads its own shard
    shards = pool2.run(bodies.sharded_load, path)
    full = bodies.full_state()
    for rank, shard in enumerate(shards):
        rows = slice(4 * rank, 4 * rank + 4)
        assert torch.equal(shard["w"], full["model"]["w"][rows])
        assert torch.equal(shard["exp_avg"], full["optim"]["state"]["w"]["exp_avg"][rows])
        assert torch.equal(shard["b"], full["model"]["b"][3 * rank : 3 * rank + 3])
        assert torch.equal(shard["c"], full["model"]["c"][:, 2 * rank : 2 * rank + 2])
        assert shard["step"] == 4


def test_every_rank_refuses_an_existing_destination(pool2, tmp_path):
    path = tmp_path / "ckpt"
    path.mkdir()
    messages = pool2.run(bodies.save_over_existing, str(path))
    assert messages[0] == messages[1] and "already exists (a directory)" in messages[0]
    assert list(path.iterdir()) == []


def test_bad_input_on_one_rank_fails_every_rank_before_writing(pool2, tmp_path):
    messages = pool2.run(bodies.bad_input_on_rank_1, str(tmp_path / "ckpt"))
    assert messages[0] == messages[1]
    assert messages[0].startswith("rank 1 of 2: save: DCP stores mapping keys as strings, so the key 0 at 'extra.0'")
    assert list(tmp_path.iterdir()) == []
