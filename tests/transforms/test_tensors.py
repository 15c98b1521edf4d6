import io

import pytest
import torch
from torch.distributed import _state_dict_utils as torch_utils

import sdtree
from sdtree.errors import StructureMismatchError, UnsupportedLeafError
from sdtree.testing import assert_state_dict_equal
from sdtree.transforms import offload_to_cpu, to_device
from tests.corpus import MODEL_STATE_DICTS, int_keyed_optimizer_state_dict, tied_state_dict


def test_offload_shares_cpu_tensors():
    sd = {"w": torch.ones(2), "n": 3}
    out = offload_to_cpu()(sd)
    assert out["w"] is sd["w"] and out == sd and out is not sd


def test_offload_to_shared_memory_copies_once_per_dtype():
    sd = {"a": torch.arange(4.0), "b": torch.ones(2, 2), "c": torch.tensor([1, 2])}
    out = offload_to_cpu(share_memory=True)(sd)
    assert all(t.is_shared() for t in out.values())
    assert not any(t.is_shared() for t in sd.values())
    assert_state_dict_equal(out, sd)
    assert out["a"].untyped_storage().data_ptr() == out["b"].untyped_storage().data_ptr()
    assert out["c"].untyped_storage().data_ptr() != out["a"].untyped_storage().data_ptr()


def test_offload_without_bulk_gives_separate_storages():
    sd = {"a": torch.arange(4.0), "b": torch.ones(2, 2)}
    out = offload_to_cpu(share_memory=True, bulk=False)(sd)
    assert out["a"].untyped_storage().data_ptr() != out["b"].untyped_storage().data_ptr()
    assert_state_dict_equal(out, sd)


def test_offload_copies_non_contiguous_tensors_by_value():
    base = torch.arange(6.0).view(2, 3)
    out = offload_to_cpu(share_memory=True)({"t": base.t()})
    assert torch.equal(out["t"], base.t())


def test_offload_of_meta_tensor_names_the_key():
    sd = {"ok": torch.ones(1), "m": torch.empty(3, device="meta")}
    with pytest.raises(UnsupportedLeafError, match=r"state_dict\['m'\].*drop_meta_tensors"):
        offload_to_cpu()(sd)


def test_offload_keeps_tied_tensors_tied_when_shared():
    sd = tied_state_dict()
    out = offload_to_cpu()(sd)
    assert out["embed.weight"] is out["head.weight"]


def test_to_device_cpu_shares_and_repr():
    sd = {"w": torch.ones(1)}
    assert to_device("cpu")(sd)["w"] is sd["w"]
    assert repr(to_device("cpu")) == "to_device('cpu')"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_offload_from_cuda_pins_in_bulk():
    sd = {"a": torch.ones(3, device="cuda"), "b": torch.zeros(2, device="cuda")}
    out = offload_to_cpu(pin_memory=True)(sd)
    assert all(t.device.type == "cpu" and t.is_pinned() for t in out.values())
    assert_state_dict_equal(out, {k: v.cpu() for k, v in sd.items()})


# -- the torch-signature utilities, against torch's own -------------------------


@pytest.mark.parametrize("name", sorted(MODEL_STATE_DICTS))
def test_offload_state_dict_to_cpu_matches_torch(name):
    sd = MODEL_STATE_DICTS[name]
    ours = sdtree.offload_state_dict_to_cpu(sd)
    theirs = torch_utils._offload_state_dict_to_cpu(sd)
    assert list(ours) == list(theirs)
    assert_state_dict_equal(ours, theirs)


def test_offload_state_dict_to_cpu_type_check_like_torch():
    sd = {"a": {1, 2}}
    with pytest.raises(ValueError):
        torch_utils._offload_state_dict_to_cpu(sd)
    with pytest.raises(UnsupportedLeafError, match=r"state_dict\['a'\] \(set\).*type_check=False"):
        sdtree.offload_state_dict_to_cpu(sd)
    assert sdtree.offload_state_dict_to_cpu(sd, type_check=False) == {"a": {1, 2}}
    assert sdtree.offload_state_dict_to_cpu({"b": io.BytesIO(b"x")})["b"].getvalue() == b"x"


@pytest.mark.parametrize("pin,share", [(False, False), (False, True)])
def test_create_cpu_state_dict_matches_torch(pin, share):
    sd = {**MODEL_STATE_DICTS["odd_dtypes"], "nested": [torch.ones(2), (torch.zeros(1), 4)], "x": None}
    ours = sdtree.create_cpu_state_dict(sd, pin_memory=pin, share_memory=share)
    theirs = torch_utils._create_cpu_state_dict(sd, pin_memory=pin, share_memory=share)
    assert sdtree.check_state_dict_similarity(ours, theirs)
    assert ours["nested"][1][1] == 4 and isinstance(ours["nested"][1], tuple) and ours["x"] is None
    assert ours["s"].item() == 0 == theirs["s"].item()
    for key in ("h", "b", "m"):
        assert ours[key].data_ptr() != sd[key].data_ptr()
        assert ours[key].is_shared() == share


def test_create_cpu_state_dict_pin_memory_without_cuda_is_unpinned():
    out = sdtree.create_cpu_state_dict({"a": torch.ones(2)}, pin_memory=True)
    assert out["a"].shape == (2,) and out["a"].is_pinned() == torch.cuda.is_available()


def test_copy_state_dict_matches_torch_and_writes_only_the_copy():
    sd = {"a": torch.arange(3.0), "b": [torch.ones(2, 2), 7], "c": "s"}
    ours_dst = sdtree.create_cpu_state_dict(sd)
    theirs_dst = sdtree.create_cpu_state_dict(sd)
    ours = sdtree.copy_state_dict(sd, ours_dst)
    theirs = torch_utils._copy_state_dict(sd, theirs_dst)
    assert_state_dict_equal(ours, theirs)
    assert_state_dict_equal(ours_dst, theirs_dst)
    assert ours["a"] is ours_dst["a"] and ours["b"][1] == 7
    assert sd["a"]._version == 0


def test_copy_state_dict_validates_before_writing():
    src = {"a": torch.ones(2), "b": torch.ones(3)}
    dst = {"a": torch.zeros(2), "b": torch.zeros(4)}
    with pytest.raises(StructureMismatchError, match=r"state_dict\['b'\]: tensor\(3,\) torch.float32 vs tensor\(4,\)"):
        sdtree.copy_state_dict(src, dst)
    assert torch.equal(dst["a"], torch.zeros(2))
    with pytest.raises(StructureMismatchError, match=r"missing from the second: state_dict\['b'\]"):
        sdtree.copy_state_dict(src, {"a": torch.zeros(2)})


@pytest.mark.parametrize(
    "other,expected",
    [
        ({"a": torch.zeros(2), "b": {"c": torch.zeros(1, dtype=torch.int64)}}, True),
        ({"b": {"c": torch.zeros(1, dtype=torch.int64)}, "a": torch.zeros(2)}, True),
        ({"a": torch.zeros(3), "b": {"c": torch.zeros(1, dtype=torch.int64)}}, False),
        ({"a": torch.zeros(2), "b": {"c": torch.zeros(1)}}, False),
        ({"a": torch.zeros(2)}, False),
        ({"a": torch.zeros(2), "b": {"c": torch.zeros(1, dtype=torch.int64)}, "d": 1}, False),
    ],
)
def test_check_state_dict_similarity_matches_torch(other, expected):
    sd = {"a": torch.ones(2), "b": {"c": torch.ones(1, dtype=torch.int64)}}
    assert sdtree.check_state_dict_similarity(sd, other) is expected
    assert torch_utils._check_state_dict_similarity(sd, other) is expected


def test_utilities_accept_optimizer_state_dicts():
    osd = int_keyed_optimizer_state_dict()
    cpu = sdtree.create_cpu_state_dict(osd)
    copied = sdtree.copy_state_dict(osd, cpu)
    assert_state_dict_equal(copied, osd)
