import pytest
import torch

from sdtree.checkpoint import destination_format, detect_format, save
from sdtree.errors import CheckpointFormatError, CheckpointNotFoundError


@pytest.fixture
def checkpoints(tmp_path):
    sd = {"w": torch.ones(2)}
    torch.save(sd, tmp_path / "plain.pt")
    save(sd, tmp_path / "model.safetensors")
    save(sd, tmp_path / "dcp")
    return tmp_path


def test_detect_format_reads_directories_and_magic_bytes(checkpoints):
    assert detect_format(checkpoints / "dcp") == "dcp"
    assert detect_format(checkpoints / "plain.pt") == "torch"
    assert detect_format(checkpoints / "model.safetensors") == "safetensors"
    (checkpoints / "renamed.bin").write_bytes((checkpoints / "model.safetensors").read_bytes())
    assert detect_format(checkpoints / "renamed.bin") == "safetensors"


def test_detect_format_reads_legacy_torch_save_files(tmp_path):
    torch.save({"w": torch.ones(2)}, tmp_path / "old.pt", _use_new_zipfile_serialization=False)
    assert detect_format(tmp_path / "old.pt") == "torch"


def test_detect_format_rejects_unknown_bytes_naming_what_it_expected(tmp_path):
    (tmp_path / "notes.txt").write_text("hello, world")
    with pytest.raises(CheckpointFormatError, match=r"'.*notes\.txt' is not a checkpoint sdtree knows: the file starts with b'hello, w'.*torch\.save.*safetensors.*DCP"):
        detect_format(tmp_path / "notes.txt")
    (tmp_path / "empty.safetensors").write_bytes(b"")
    with pytest.raises(CheckpointFormatError, match="the file is empty"):
        detect_format(tmp_path / "empty.safetensors")


def test_detect_format_rejects_directory_without_metadata(tmp_path):
    with pytest.raises(CheckpointFormatError, match=r"directory without a '\.metadata' file"):
        detect_format(tmp_path)


def test_detect_format_names_missing_path(tmp_path):
    with pytest.raises(CheckpointNotFoundError, match=r"no checkpoint at '.*nothing\.pt': the path does not exist"):
        detect_format(tmp_path / "nothing.pt")


@pytest.mark.parametrize(
    "name, expected",
    [("m.safetensors", "safetensors"), ("m.pt", "torch"), ("m.PTH", "torch"), ("m.bin", "torch"), ("step-10", "dcp"), ("ckpt/", "dcp")],
)
def test_destination_format_from_name(tmp_path, name, expected):
    assert destination_format(f"{tmp_path}/{name}") == expected


def test_destination_format_prefers_to_and_rejects_unknown(tmp_path):
    assert destination_format(tmp_path / "m.pt", "safetensors") == "safetensors"
    with pytest.raises(CheckpointFormatError, match=r"unknown checkpoint format to='npz'"):
        destination_format(tmp_path / "m.pt", "npz")
    with pytest.raises(CheckpointFormatError, match=r"cannot tell which format.*'\.npz'.*to="):
        destination_format(tmp_path / "m.npz")
