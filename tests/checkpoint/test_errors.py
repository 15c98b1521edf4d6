"""Bad input gives one clear error, and never leaves partial output behind."""

import pytest
import torch

from sdtree.checkpoint import convert, load, save
from sdtree.errors import CheckpointNotFoundError, CorruptCheckpointError, DestinationExistsError
from tests.checkpoint import cases


def _files(path):
    return sorted(p.name for p in path.iterdir())


@pytest.fixture
def dcp_dir(tmp_path):
    save(cases.combined(), tmp_path / "ckpt")
    return tmp_path / "ckpt"


def test_missing_shard_file_is_named(dcp_dir, tmp_path):
    (dcp_dir / "__0_0.distcp").unlink()
    with pytest.raises(CorruptCheckpointError, match=r"1 shard file\(s\) named in \.metadata are missing: '__0_0\.distcp'\. Copy the whole"):
        load(dcp_dir)
    with pytest.raises(CorruptCheckpointError, match="are missing"):
        convert(dcp_dir, tmp_path / "out.pt")
    assert _files(tmp_path) == ["ckpt"]


def test_garbled_shard_fails_during_conversion_without_output(dcp_dir, tmp_path):
    shard = dcp_dir / "__0_0.distcp"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2 :] = b"\0" * (len(data) - len(data) // 2)
    shard.write_bytes(bytes(data))
    for dst in ("out.pt", "out.safetensors", "out"):
        with pytest.raises(CorruptCheckpointError, match=r"DCP checkpoint '.*ckpt'.* is corrupt"):
            convert(dcp_dir, tmp_path / "new" / dst, model_only=True)
    assert _files(tmp_path) == ["ckpt"]


def test_garbled_dcp_metadata_is_corrupt(dcp_dir):
    (dcp_dir / ".metadata").write_bytes(b"\x80\x04not a pickle at all")
    with pytest.raises(CorruptCheckpointError, match=r"\.metadata is corrupt: it could not be unpickled"):
        load(dcp_dir)


def test_truncated_torch_file_is_corrupt(tmp_path):
    save(cases.combined(), tmp_path / "m.pt")
    data = (tmp_path / "m.pt").read_bytes()
    (tmp_path / "m.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CorruptCheckpointError, match=r"torch\.save file '.*m\.pt' is corrupt or truncated: "):
        load(tmp_path / "m.pt")


def test_truncated_safetensors_file_is_corrupt(tmp_path):
    save(cases.model_state_dict(), tmp_path / "m.safetensors")
    data = (tmp_path / "m.safetensors").read_bytes()
    (tmp_path / "m.safetensors").write_bytes(data[:-10])
    with pytest.raises(CorruptCheckpointError, match=r"safetensors file '.*m\.safetensors' is truncated or corrupt: Error while deserializing header"):
        load(tmp_path / "m.safetensors")


def test_garbled_safetensors_header_is_corrupt(tmp_path):
    header = b'{"w": oops}'
    (tmp_path / "m.safetensors").write_bytes(len(header).to_bytes(8, "little") + header)
    with pytest.raises(CorruptCheckpointError, match=r"m\.safetensors' is truncated or corrupt: Error while deserializing header"):
        load(tmp_path / "m.safetensors")


def test_missing_source_is_named(tmp_path):
    with pytest.raises(CheckpointNotFoundError, match=r"no checkpoint at '.*nope\.pt'"):
        convert(tmp_path / "nope.pt", tmp_path / "out.pt")


def test_existing_destination_is_checked_before_reading(tmp_path):
    (tmp_path / "out.pt").write_bytes(b"mine")
    with pytest.raises(DestinationExistsError, match=r"'.*out\.pt' already exists \(a file\)\. Pass force=True \(--force"):
        convert(tmp_path / "nope.pt", tmp_path / "out.pt")
    with pytest.raises(DestinationExistsError):
        save({"w": torch.ones(1)}, tmp_path / "out.pt")
    assert (tmp_path / "out.pt").read_bytes() == b"mine"


def test_interrupted_conversion_leaves_nothing(dcp_dir, tmp_path):
    def interrupt(nbytes, total):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        convert(dcp_dir, tmp_path / "a" / "b" / "out.pt", progress=interrupt)
    assert _files(tmp_path) == ["ckpt"]
