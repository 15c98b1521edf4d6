"""sdtree.Stager in one process: the mirror, what one stage copies, and its errors."""

from __future__ import annotations

import pytest
import torch
import torch.distributed.checkpoint as dcp

import sdtree
from sdtree.errors import StagerClosedError, StagingMismatchError, UnsupportedLeafError
from sdtree.testing import assert_state_dict_equal


def _state_dict():
    torch.manual_seed(0)
    embed = torch.randn(6, 4)
    qkv = torch.randn(9, 4)
    q, k, v = qkv.split(3)
    return {
        "model": {"embed.weight": embed, "head.weight": embed, "q": q, "k": k, "v": v, "norm": torch.randn(4)},
        "optim": {"state": {"norm": {"step": torch.tensor(3.0), "exp_avg": torch.randn(4)}}, "param_groups": [{"lr": 0.1, "params": ["norm"]}]},
        "step": 7,
        "note": None,
    }


def _fresh(seed: int):
    """The same layout as ``_state_dict`` over new tensor objects with new values."""
    torch.manual_seed(seed)
    sd = _state_dict()
    embed = torch.randn(6, 4)
    qkv = torch.randn(9, 4)
    q, k, v = qkv.split(3)
    sd["model"].update({"embed.weight": embed, "head.weight": embed, "q": q, "k": k, "v": v, "norm": torch.randn(4)})
    sd["optim"]["state"]["norm"]["exp_avg"] = torch.randn(4)
    sd["step"] = seed
    return sd


def _storage(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


def test_stage_returns_a_mirror_of_the_same_structure_and_values():
    sd = _state_dict()
    stager = sdtree.Stager(sd)
    mirror = stager.stage(sd)
    assert isinstance(mirror, dict)  # on CPU the copy is done when stage returns
    assert_state_dict_equal(mirror, sd)
    assert list(mirror) == list(sd) and list(mirror["model"]) == list(sd["model"])
    assert mirror["step"] == 7 and mirror["note"] is None and mirror["optim"]["param_groups"] == sd["optim"]["param_groups"]
    for key, value in sd["model"].items():
        assert _storage(mirror["model"][key]) != _storage(value), key
    assert stager.wait() is mirror


def test_mirror_keeps_values_of_stage_time_and_its_buffers():
    sd = _state_dict()
    stager = sdtree.Stager(sd)
    first = stager.stage(sd)
    ptrs = {k: t.data_ptr() for k, t in first["model"].items()}
    kept = first["model"]["norm"].clone()
    sd["model"]["norm"].add_(1)  # training goes on
    assert torch.equal(first["model"]["norm"], kept)
    second = stager.stage(sd)
    assert {k: t.data_ptr() for k, t in second["model"].items()} == ptrs  # no new memory per stage
    assert torch.equal(second["model"]["norm"], sd["model"]["norm"])


def test_tied_weights_share_mirror_storage_and_are_copied_once():
    a = torch.randn(100, 10)
    sd = {"embed": a, "head": a, "other": torch.randn(5)}
    stager = sdtree.Stager(sd)
    mirror = stager.stage(sd)
    assert mirror["embed"].data_ptr() == mirror["head"].data_ptr()
    assert stager.bytes_per_stage == a.numel() * 4 + 5 * 4  # once, not twice


def test_views_of_one_storage_share_one_mirror_storage_with_their_offsets():
    qkv = torch.randn(9, 4)
    q, k, v = qkv.split(3)
    sd = {"qkv": qkv, "q": q, "k": k, "v": v, "t": qkv.t(), "col": qkv[:, 1]}
    stager = sdtree.Stager(sd)
    mirror = stager.stage(sd)
    assert_state_dict_equal(mirror, sd)
    assert len({_storage(t) for t in mirror.values()}) == 1
    for key, value in sd.items():
        got = mirror[key]
        assert got.stride() == value.stride() and got.storage_offset() - mirror["qkv"].storage_offset() == value.storage_offset(), key
    assert stager.bytes_per_stage == qkv.numel() * 4  # one copy of the storage's span


def test_new_tensor_objects_with_new_values_are_staged():
    """torchtitan#3675: hooks give new tensors each call; the mirror must follow them."""
    stager = sdtree.Stager(_state_dict())
    for seed in (1, 2):
        sd = _fresh(seed)
        mirror = stager.stage(sd)
        assert_state_dict_equal(mirror, sd)
        assert mirror["step"] == seed


def test_staging_leaves_the_input_untouched():
    sd = _state_dict()
    before = {k: (v.clone(), v._version) for k, v in sd["model"].items()}
    stager = sdtree.Stager(sd)
    stager.stage(sd)
    assert {k: v._version for k, v in sd["model"].items()} == {k: ver for k, (_, ver) in before.items()}
    assert all(torch.equal(sd["model"][k], v) for k, (v, _) in before.items())


def test_share_memory_and_pinning():
    sd = {"w": torch.randn(3), "b": torch.randn(2, 2)}
    shared = sdtree.Stager(sd, share_memory=True).stage(sd)
    assert all(t.is_shared() for t in shared.values())
    plain = sdtree.Stager(sd).stage(sd)
    assert not any(t.is_shared() for t in plain.values())
    assert all(t.is_pinned() == torch.cuda.is_available() for t in plain.values())  # pinned where CUDA is


@pytest.mark.parametrize(
    "change, match",
    [
        (lambda sd: sd["model"].update(norm=torch.randn(5)), r"\['model'\]\['norm'\]: expected tensor\(4,\) torch.float32 on cpu, found tensor\(5,\)"),
        (lambda sd: sd["model"].update(norm=torch.randn(4, dtype=torch.float64)), r"\['model'\]\['norm'\]: .*found tensor\(4,\) torch.float64"),
        (lambda sd: sd["model"].pop("norm"), r"1 path\(s\) of the mirror missing: state_dict\['model'\]\['norm'\]"),
        (lambda sd: sd.update(extra=torch.ones(1)), r"1 path\(s\) the mirror lacks: state_dict\['extra'\]"),
        (lambda sd: sd.update(step=torch.tensor(1)), r"\['step'\]: expected a non-tensor value, found tensor"),
        (lambda sd: sd["model"].update({"head.weight": torch.randn(6, 4)}), r"no longer share storage .*\['model'\]\['head.weight'\] with state_dict\['model'\]\['embed.weight'\]"),
        (lambda sd: sd["model"].update(k=torch.randn(3, 4)), r"no longer share storage .*\['model'\]\['k'\]"),
    ],
    ids=["shape", "dtype", "missing_key", "extra_key", "tensor_for_value", "untied", "view_now_alone"],
)
def test_a_state_dict_of_another_layout_is_an_error_naming_the_key_and_stages_nothing(change, match):
    stager = sdtree.Stager(_state_dict())
    staged = stager.stage(_state_dict())
    before = {k: v.clone() for k, v in staged["model"].items()}
    sd = _fresh(3)
    change(sd)
    with pytest.raises(StagingMismatchError, match=match) as info:
        stager.stage(sd)
    assert "rebuild=True" in str(info.value) and "Nothing was staged" in str(info.value)
    assert all(torch.equal(staged["model"][k], v) for k, v in before.items())  # validated before any copy


def test_rebuild_builds_a_new_mirror_for_a_new_layout():
    stager = sdtree.Stager({"w": torch.randn(2)}, rebuild=True)
    stager.stage({"w": torch.randn(2)})
    sd = {"w": torch.randn(3, 3), "b": torch.randn(1)}
    mirror = stager.stage(sd)
    assert_state_dict_equal(mirror, sd)
    assert stager.bytes_per_stage == 10 * 4


def test_meta_tensors_cannot_be_staged():
    with pytest.raises(UnsupportedLeafError, match=r"state_dict\['m'\]"):
        sdtree.Stager({"m": torch.empty(2, device="meta"), "w": torch.ones(1)})


def test_a_closed_stager_does_not_stage():
    sd = {"w": torch.ones(2)}
    stager = sdtree.Stager(sd)
    stager.close()
    with pytest.raises(StagerClosedError, match="closed"):
        stager.stage(sd)


def test_stager_is_an_async_stager():
    from torch.distributed.checkpoint.staging import AsyncStager

    stager = sdtree.Stager({"w": torch.ones(1)})
    assert isinstance(stager, AsyncStager)
    assert stager.should_synchronize_after_execute


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")  # no_dist=True warns anyway
def test_async_save_saves_the_mirror_as_staged(tmp_path):
    sd = _state_dict()
    stager = sdtree.Stager(sd)
    expected = {k: v.clone() for k, v in sd["model"].items()}
    future = dcp.async_save(sd, checkpoint_id=str(tmp_path), async_stager=stager, no_dist=True)
    for value in sd["model"].values():
        value.add_(100)  # training goes on at once; the save must not see it
    future.result()
    stager.close()
    loaded = {"model": {k: torch.zeros_like(v) for k, v in expected.items()}}
    dcp.load(loaded, checkpoint_id=str(tmp_path), no_dist=True)
    assert_state_dict_equal(loaded["model"], expected)
