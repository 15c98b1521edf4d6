"""Round trips as laws, over generated state dicts (sdtree.testing strategies)."""

import tempfile
from pathlib import Path

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import sdtree
from sdtree.checkpoint import load, save
from sdtree.testing import assert_state_dict_equal, state_dicts

FEW = settings(max_examples=25, deadline=None)


def _round_trip(sd, name):
    with tempfile.TemporaryDirectory() as tmp:
        save(sd, Path(tmp) / name)
        return load(Path(tmp) / name)


def _same_objects(sd, loaded):
    """Keys that held one tensor object still do. Only tensors: two keys may
    hold one int or float object too (hypothesis hands out its boundary
    values and nasty floats as the same objects), and no format keeps the
    identity of numbers (pickle does not memoize them)."""
    groups = {}
    for key, value in sd.items():
        if isinstance(value, torch.Tensor):
            groups.setdefault(id(value), []).append(key)
    return all(loaded[a] is loaded[b] for keys in groups.values() if len(keys) > 1 for a, b in zip(keys, keys[1:]))


@FEW
@given(state_dicts())
def test_torch_file_round_trip(sd):
    loaded = _round_trip(sd, "m.pt")
    assert_state_dict_equal(loaded, sd)
    assert list(loaded) == list(sd) and _same_objects(sd, loaded)


@FEW
@given(state_dicts(tensors_only=True))
def test_safetensors_round_trip(sd):
    loaded = _round_trip(sd, "m.safetensors")
    assert_state_dict_equal(loaded, sd)
    assert list(loaded) == list(sd) and _same_objects(sd, loaded)


@FEW
@given(state_dicts(min_size=1, tensors_only=True), st.sampled_from(["ckpt.pt", "ckpt"]))
def test_combined_round_trip_through_torch_and_dcp(sd, name):
    # tensors only: DCP stores leaves, so empty containers nested in values would vanish
    checkpoint = {"model": sd, "step": 1, "note": "x"}
    assert_state_dict_equal(_round_trip(checkpoint, name), checkpoint)


def test_optimizer_without_state_round_trips_through_dcp(tmp_path):
    model = torch.nn.Linear(2, 2)
    model_sd, optim_sd = sdtree.get_state_dict(model, torch.optim.SGD(model.parameters(), lr=0.1))
    assert optim_sd["state"] == {}
    save({"model": model_sd, "optim": optim_sd}, tmp_path / "ckpt")
    assert_state_dict_equal(load(tmp_path / "ckpt"), {"model": model_sd, "optim": optim_sd})
