"""Checkpoints come from strangers: reading one never runs code from it unless trusted."""

import pickle

import pytest
import torch
from torch.distributed.checkpoint import FileSystemWriter
from torch.distributed.checkpoint import save as dcp_save

from sdtree.checkpoint import convert, describe, load, open_checkpoint, save
from sdtree.errors import UnsafeCheckpointError
from tests.checkpoint.cases import Payload


@pytest.fixture
def marker(tmp_path):
    return tmp_path / "code-ran"


def _torch_file(tmp_path, marker):
    path = tmp_path / "evil.pt"
    torch.save({"w": torch.ones(2), "x": Payload(marker)}, path)
    return path


@pytest.mark.parametrize("read", [load, open_checkpoint, describe, lambda p: convert(p, p.with_name("out.pt"))])
def test_torch_file_that_would_run_code_is_refused(tmp_path, marker, read):
    path = _torch_file(tmp_path, marker)
    with pytest.raises(UnsafeCheckpointError, match=r"evil\.pt' was refused: its pickle imports '(builtins\.)?exec'.*trust_pickle=True \(--trust-pickle"):
        read(path)
    assert not marker.exists()
    assert not (tmp_path / "out.pt").exists()


def test_trust_pickle_unpickles_everything(tmp_path, marker):
    path = _torch_file(tmp_path, marker)
    loaded = load(path, trust_pickle=True)
    assert marker.exists() and torch.equal(loaded["w"], torch.ones(2))


def test_dcp_metadata_that_would_run_code_is_refused(tmp_path, marker):
    save({"w": torch.ones(2)}, tmp_path / "ckpt")
    (tmp_path / "ckpt" / ".metadata").write_bytes(pickle.dumps(Payload(marker)))
    with pytest.raises(UnsafeCheckpointError, match=r"\.metadata was refused: it imports builtins\.exec.*trust_pickle=True"):
        load(tmp_path / "ckpt")
    assert not marker.exists()


def test_dcp_value_that_would_run_code_is_refused(tmp_path, marker):
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch warns that no process group is up
        dcp_save({"w": torch.ones(2), "x": Payload(marker)}, storage_writer=FileSystemWriter(tmp_path / "ckpt"), no_dist=True)
    assert not marker.exists()
    with pytest.raises(UnsafeCheckpointError, match=r"'x' was refused: its pickle imports '(builtins\.)?exec'.*trust_pickle=True"):
        load(tmp_path / "ckpt")
    with pytest.raises(UnsafeCheckpointError):
        load(tmp_path / "ckpt", template={"x": None})
    assert not marker.exists()
    assert torch.equal(load(tmp_path / "ckpt", trust_pickle=True)["w"], torch.ones(2))
    assert marker.exists()
