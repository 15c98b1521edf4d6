import pytest
import torch

from sdtree.errors import (
    KeyCollisionError,
    LayoutMismatchError,
    MissingParamIdError,
    NotAMappingError,
    UnsupportedLeafError,
)
from sdtree.testing import assert_state_dict_equal
from sdtree.transforms import (
    OptimizerLayout,
    flatten_optimizer,
    fqns_to_param_ids,
    merge_optimizers,
    optimizer_layout,
    param_ids_to_fqns,
    split_optimizer,
    strip_prefix,
    unflatten_optimizer,
)
from tests.corpus import FQNS, int_keyed_optimizer_state_dict


def test_param_ids_to_fqns_rekeys_state_and_params():
    osd = int_keyed_optimizer_state_dict()
    out = param_ids_to_fqns(FQNS)(osd)
    assert list(out["state"]) == ["module.layer.weight", "module.layer.bias"]
    assert [g["params"] for g in out["param_groups"]] == [
        ["module.layer.weight"],
        ["module.layer.bias", "module.frozen.weight"],
        [],
    ]
    assert out["state"]["module.layer.weight"] is osd["state"][0]
    assert out["param_groups"][0]["betas"] is osd["param_groups"][0]["betas"]
    assert list(osd["state"]) == [0, 1]


def test_param_ids_round_trip_through_fqns():
    osd = int_keyed_optimizer_state_dict()
    t = param_ids_to_fqns(FQNS)
    assert_state_dict_equal(t.inverse()(t(osd)), osd)
    assert_state_dict_equal(fqns_to_param_ids({v: k for k, v in FQNS.items()})(t(osd)), osd)


def test_param_ids_to_fqns_names_missing_ids():
    with pytest.raises(MissingParamIdError, match=r"1 optimizer key\(s\) are not in the mapping of 2 entries: 2"):
        param_ids_to_fqns({0: "a", 1: "b"})(int_keyed_optimizer_state_dict())


def test_param_ids_to_fqns_rejects_two_ids_for_one_fqn():
    with pytest.raises(KeyCollisionError, match=r"keys 0 and 1 both map to 'w'"):
        param_ids_to_fqns({0: "w", 1: "w", 2: "x"})(int_keyed_optimizer_state_dict())


def test_param_ids_to_fqns_repr_is_short_for_big_mappings():
    assert repr(param_ids_to_fqns({i: f"p{i}" for i in range(100)})) == (
        "param_ids_to_fqns({0: 'p0', 1: 'p1', ...} (100 entries))"
    )


def test_optimizer_transform_rejects_model_state_dict():
    with pytest.raises(NotAMappingError, match=r"expected an optimizer state dict .*found keys 'w'"):
        param_ids_to_fqns({})({"w": torch.ones(1)})


def _fqn_osd():
    return param_ids_to_fqns(FQNS)(int_keyed_optimizer_state_dict())


def test_flatten_optimizer_matches_torch_flat_form():
    from torch.distributed.checkpoint.state_dict import _flatten_optim_state_dict

    osd = _fqn_osd()
    osd["param_groups"] = osd["param_groups"][:2]  # torch cannot unflatten empty groups
    ours = flatten_optimizer()(osd)
    theirs = _flatten_optim_state_dict(
        {"state": osd["state"], "param_groups": [dict(g) for g in osd["param_groups"]]}
    )
    assert list(ours) == list(theirs)
    assert_state_dict_equal(ours, theirs)


def test_flatten_optimizer_keys_and_values():
    osd = _fqn_osd()
    flat = flatten_optimizer()(osd)
    assert flat["state.module.layer.weight.step"] is osd["state"]["module.layer.weight"]["step"]
    assert flat["param_groups.module.frozen.weight.lr"] == 0.01
    assert flat["param_groups.module.layer.bias.betas"] == (0.9, 0.95)
    assert "state.module.frozen.weight.step" not in flat


def test_flatten_then_unflatten_restores_int_keys_and_empty_groups():
    osd = int_keyed_optimizer_state_dict()
    osd["state"][2] = {}
    layout = optimizer_layout(osd)
    assert layout.param_groups == ((0,), (1, 2), ())
    assert layout.empty_group_hyperparams == {2: {"lr": 0.5, "betas": (0.9, 0.95), "weight_decay": 0.0}}
    assert layout.empty_states == (2,)
    assert_state_dict_equal(unflatten_optimizer(layout)(flatten_optimizer()(osd)), osd)


def test_unflatten_nested_state():
    osd = {
        "state": {"w": {"step": 1, "pre": {"f": torch.ones(2), "s": {"n": 3}}}},
        "param_groups": [{"lr": 1.0, "params": ["w"]}],
    }
    flat = flatten_optimizer()(osd)
    assert list(flat) == ["state.w.step", "state.w.pre.f", "state.w.pre.s.n", "param_groups.w.lr"]
    assert_state_dict_equal(unflatten_optimizer([["w"]])(flat), osd)


def test_unflatten_with_plain_layout_needs_hypers_of_empty_groups():
    flat = flatten_optimizer()(_fqn_osd())
    layout = [list(g["params"]) for g in _fqn_osd()["param_groups"]]
    with pytest.raises(LayoutMismatchError, match="param group 2 has no parameters.*optimizer_layout"):
        unflatten_optimizer(layout)(flat)


def test_unflatten_names_keys_outside_the_layout():
    flat = flatten_optimizer()(_fqn_osd())
    with pytest.raises(LayoutMismatchError, match=r"match no parameter of the layout: 'state\.module\.layer\.bias\.step'"):
        unflatten_optimizer([["module.layer.weight"]])(flat)


def test_unflatten_names_layout_params_missing_from_flat_dict():
    with pytest.raises(LayoutMismatchError, match=r"param group 0 lists 1 key\(s\) with no .*'b'"):
        unflatten_optimizer([["a", "b"]])({"param_groups.a.lr": 0.1})


def test_unflatten_rejects_disagreeing_hyperparameters():
    flat = {"param_groups.a.lr": 0.1, "param_groups.b.lr": 0.2}
    with pytest.raises(LayoutMismatchError, match=r"params 'a' and 'b' of param group 0 have different hyper-parameters \['lr'\]"):
        unflatten_optimizer([["a", "b"]])(flat)


def test_flatten_rejects_unsupported_state_values():
    osd = {"state": {"w": {"buf": [1, 2]}}, "param_groups": [{"params": ["w"]}]}
    with pytest.raises(UnsupportedLeafError, match=r"state value 'state\.w\.buf' has type list"):
        flatten_optimizer()(osd)
    osd = {"state": {"w": {"buf": {}}}, "param_groups": [{"params": ["w"]}]}
    with pytest.raises(UnsupportedLeafError, match="empty dict"):
        flatten_optimizer()(osd)


def test_flatten_rejects_param_in_two_groups():
    osd = {"state": {}, "param_groups": [{"params": ["w"]}, {"params": ["w"]}]}
    with pytest.raises(KeyCollisionError, match="'w' is in param group 0 and in param group 1"):
        flatten_optimizer()(osd)


def test_key_pipeline_then_flatten_round_trip():
    osd = _fqn_osd()
    t = strip_prefix("module.") >> flatten_optimizer()
    flat = t(osd)
    layout = optimizer_layout(strip_prefix("module.")(osd))
    back = (unflatten_optimizer(layout) >> strip_prefix("module.").inverse())(flat)
    assert_state_dict_equal(back, osd)


def test_merge_and_split_optimizers_round_trip():
    a = {"state": {"x": {"step": 1}}, "param_groups": [{"lr": 1.0, "params": ["x"]}]}
    b = {"state": {"y": {"step": 2}}, "param_groups": [{"lr": 2.0, "params": ["y", "z"]}, {"lr": 3.0, "params": []}]}
    merged = merge_optimizers()([a, b])
    assert list(merged["state"]) == ["x", "y"]
    assert [g["lr"] for g in merged["param_groups"]] == [1.0, 2.0, 3.0]
    split = split_optimizer([optimizer_layout(a), optimizer_layout(b)])
    parts = split(merged)
    assert len(parts) == 2
    assert_state_dict_equal(parts[0], a)
    assert_state_dict_equal(parts[1], b)
    assert split.inverse()(parts) == merged


def test_merge_rejects_parameter_in_two_optimizers():
    a = {"state": {}, "param_groups": [{"params": ["x"]}]}
    with pytest.raises(KeyCollisionError, match="'x' is in optimizer 0 and optimizer 1"):
        merge_optimizers()([a, a])


def test_split_checks_layout():
    merged = {"state": {}, "param_groups": [{"params": ["x"]}]}
    with pytest.raises(LayoutMismatchError, match="has 1 param groups, the layouts expect 2"):
        split_optimizer([[["x"]], [["y"]]])(merged)
    with pytest.raises(LayoutMismatchError, match=r"param group 0 holds 'x', but layout 0 expects 'y'"):
        split_optimizer([[["y"]]])(merged)
    with pytest.raises(LayoutMismatchError, match=r"1 state key\(s\) belong to no layout: 'q'"):
        split_optimizer([[["x"]]])({"state": {"q": {}}, "param_groups": [{"params": ["x"]}]})


def test_layout_accepts_plain_lists():
    assert OptimizerLayout([["a"], []]).param_groups == (("a",), ())
    with pytest.raises(TypeError, match="layout must be an OptimizerLayout"):
        unflatten_optimizer("ab")
