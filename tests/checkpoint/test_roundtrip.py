import json

import pytest
import safetensors.torch
import torch

from sdtree.checkpoint import load, open_checkpoint, save
from sdtree.checkpoint._torch_file import TorchArchive
from sdtree.errors import CheckpointFormatError, IncompatibleStateDictError, UnsupportedLeafError
from sdtree.testing import assert_state_dict_equal
from tests.checkpoint import cases
from tests.corpus import MODEL_STATE_DICTS, int_keyed_optimizer_state_dict, tied_state_dict


@pytest.mark.parametrize("name", ["ckpt.pt", "ckpt"])
def test_model_and_optimizer_round_trip(tmp_path, name):
    checkpoint = cases.combined()
    save(checkpoint, tmp_path / name)
    loaded = load(tmp_path / name)
    assert_state_dict_equal(loaded, checkpoint)
    assert list(loaded["model"]) == list(checkpoint["model"])
    assert loaded["model"]["scale"].dtype == torch.bfloat16


def test_plain_tensors_are_read_straight_into_place(tmp_path, monkeypatch):
    sd = {"big": torch.randn(512, 1024), "t": torch.randn(300, 1000).t(), "small": torch.ones(3)}
    save(sd, tmp_path / "ckpt")
    calls = []
    read = TorchArchive.read_record_into
    monkeypatch.setattr(TorchArchive, "read_record_into", lambda self, key, out: calls.append(out.shape) or read(self, key, out))
    assert_state_dict_equal(load(tmp_path / "ckpt"), sd)
    # small ones too (their CRC checked); the transposed one goes through torch's reader
    assert calls == [torch.Size([512, 1024]), torch.Size([3])]


@pytest.mark.parametrize("name", sorted(MODEL_STATE_DICTS))
@pytest.mark.parametrize("suffix", [".pt", ""])
def test_corpus_round_trips_through_torch_and_dcp(tmp_path, name, suffix):
    sd = MODEL_STATE_DICTS[name]
    save(sd, tmp_path / f"ckpt{suffix}")
    assert_state_dict_equal(load(tmp_path / f"ckpt{suffix}"), dict(sd))


@pytest.mark.parametrize("name", ["plain", "ordered", "odd_dtypes"])
def test_tensor_corpus_round_trips_through_safetensors(tmp_path, name):
    sd = MODEL_STATE_DICTS[name]
    save(sd, tmp_path / "m.safetensors")
    loaded = load(tmp_path / "m.safetensors")
    assert_state_dict_equal(loaded, dict(sd))
    assert list(loaded) == list(sd)


def test_torch_file_loads_with_plain_weights_only_torch_load(tmp_path):
    checkpoint = cases.combined()
    save(checkpoint, tmp_path / "ckpt.pt")
    assert_state_dict_equal(torch.load(tmp_path / "ckpt.pt", weights_only=True), checkpoint)


@pytest.mark.parametrize("name", ["m.pt", "m.safetensors"])
def test_tied_tensors_are_stored_once_and_load_as_one_object(tmp_path, name):
    sd = cases.model_state_dict()  # distinct tensor objects sharing storage, as state_dict() gives
    assert sd["head.weight"] is not sd["embed.weight"]
    save(sd, tmp_path / name)
    loaded = load(tmp_path / name)
    assert loaded["head.weight"] is loaded["embed.weight"]
    assert list(loaded) == list(sd)
    assert_state_dict_equal(loaded, sd)
    stored = sum(t.numel() * t.element_size() for t in {id(t): t for t in loaded.values()}.values())
    assert (tmp_path / name).stat().st_size < stored + 4096


def test_safetensors_file_records_aliases_and_loads_with_safetensors(tmp_path):
    sd = tied_state_dict()
    save(sd, tmp_path / "m.safetensors")
    with open(tmp_path / "m.safetensors", "rb") as f:
        header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
    assert json.loads(header["__metadata__"]["sdtree.aliases"]) == [[1, "head.weight", "embed.weight"]]
    theirs = safetensors.torch.load_file(tmp_path / "m.safetensors")
    assert sorted(theirs) == ["embed.weight", "head.bias"]
    assert torch.equal(theirs["embed.weight"], sd["embed.weight"])


def test_reads_safetensors_written_by_the_safetensors_package(tmp_path):
    sd = {"a": torch.randn(3, 2), "b": torch.arange(4, dtype=torch.int16), "c": torch.ones(2, dtype=torch.bfloat16)}
    safetensors.torch.save_file(sd, tmp_path / "theirs.safetensors")
    assert_state_dict_equal(load(tmp_path / "theirs.safetensors"), sd)


def test_views_and_non_contiguous_tensors_are_stored_compactly(tmp_path):
    base = torch.arange(4000.0).view(40, 100)
    sd = {"t": base[:4, :5].t(), "row": base[1, :10], "slice": base[:3, 2:4]}
    for name in ("v.pt", "v.safetensors"):
        save(sd, tmp_path / name)
        assert_state_dict_equal(load(tmp_path / name), sd)
        assert (tmp_path / name).stat().st_size < 4000  # torch.save would store all of base: 16 kB


def test_open_checkpoint_reads_structure_first_and_tensors_on_demand(tmp_path):
    checkpoint = cases.combined()
    save(checkpoint, tmp_path / "ckpt")
    opened = open_checkpoint(tmp_path / "ckpt")
    placeholder = opened.tree["model"]["mlp.0.weight"]
    assert placeholder.is_meta and placeholder.shape == (5, 4)
    assert opened.tree["step"] == 3
    assert torch.equal(opened.fetch(placeholder), checkpoint["model"]["mlp.0.weight"])


def test_safetensors_refuses_an_optimizer_and_non_tensors(tmp_path):
    with pytest.raises(CheckpointFormatError, match=r"model state dict only, but the checkpoint also holds 'optim', 'step'.*model_only=True"):
        save(cases.combined(), tmp_path / "m.safetensors")
    with pytest.raises(CheckpointFormatError, match=r"optimizer state dict.*'dcp' or 'torch'"):
        save(cases.combined()["optim"], tmp_path / "m.safetensors")
    with pytest.raises(CheckpointFormatError, match=r"'count' holds a int.*drop_keys"):
        save({"w": torch.ones(1), "count": 3}, tmp_path / "m.safetensors")
    assert list(tmp_path.iterdir()) == []


def test_combined_checkpoint_with_model_only_goes_to_safetensors(tmp_path):
    checkpoint = cases.combined()
    save({"model": checkpoint["model"]}, tmp_path / "m.safetensors")
    assert_state_dict_equal(load(tmp_path / "m.safetensors"), checkpoint["model"])


def test_dcp_refuses_int_keys_that_would_load_back_as_strings(tmp_path):
    with pytest.raises(CheckpointFormatError, match=r"key 0 at 'optim\.state\.0' would load back as a string.*FQNs"):
        save({"optim": int_keyed_optimizer_state_dict()}, tmp_path / "ckpt")
    assert list(tmp_path.iterdir()) == []


def test_file_formats_refuse_meta_tensors(tmp_path):
    with pytest.raises(UnsupportedLeafError, match=r"'w' is a meta tensor.*drop_meta_tensors"):
        save({"w": torch.empty(2, device="meta")}, tmp_path / "m.pt")
    assert list(tmp_path.iterdir()) == []


def test_dcp_load_with_template_reads_only_its_keys(tmp_path):
    checkpoint = cases.combined()
    save(checkpoint, tmp_path / "ckpt")
    template = {"model": {"mlp.0.weight": torch.zeros(5, 4)}, "step": 0}
    loaded = load(tmp_path / "ckpt", template=template)
    assert torch.equal(loaded["model"]["mlp.0.weight"], checkpoint["model"]["mlp.0.weight"])
    assert loaded["step"] == 3
    assert template["step"] == 0 and not template["model"]["mlp.0.weight"].any()


def test_dcp_load_with_template_names_keys_the_checkpoint_lacks(tmp_path):
    save({"w": torch.ones(2)}, tmp_path / "ckpt")
    with pytest.raises(IncompatibleStateDictError, match=r"Missing key.*nope.*template"):
        load(tmp_path / "ckpt", template={"nope": torch.zeros(2)})


def test_template_is_for_dcp_only(tmp_path):
    save({"w": torch.ones(2)}, tmp_path / "m.pt")
    with pytest.raises(CheckpointFormatError, match="template= reshards DCP checkpoints only"):
        load(tmp_path / "m.pt", template={"w": torch.zeros(2)})


@pytest.mark.parametrize("name", ["m.safetensors", "m.pt", "dcp"])
def test_each_fetch_is_a_tensor_of_its_own(tmp_path, name):
    """Writing into what one fetch gave never shows in the next (nor in the file)."""
    save({"w": torch.zeros(4)}, tmp_path / name)
    checkpoint = open_checkpoint(tmp_path / name)
    first = checkpoint.fetch(checkpoint.tree["w"])
    first.add_(1)
    assert torch.equal(checkpoint.fetch(checkpoint.tree["w"]), torch.zeros(4))
    assert torch.equal(load(tmp_path / name)["w"], torch.zeros(4))
