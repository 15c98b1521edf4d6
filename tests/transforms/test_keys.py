import re

import pytest
import torch

from sdtree.errors import (
    InvalidRuleError,
    KeyCollisionError,
    LayoutMismatchError,
    MissingPrefixError,
    NonStringKeyError,
    NotAMappingError,
    NotInvertibleError,
    SdtreeError,
)
from sdtree.transforms import (
    add_prefix,
    drop_keys,
    drop_meta_tensors,
    flatten_optimizer,
    rename,
    select_keys,
    strip_prefix,
)
from tests.corpus import MODEL_STATE_DICTS


def test_strip_prefix_strips_and_shares_values():
    sd = {"module.a": torch.ones(1), "module.b.c": torch.zeros(2)}
    out = strip_prefix("module.")(sd)
    assert list(out) == ["a", "b.c"]
    assert out["a"] is sd["module.a"]
    assert list(sd) == ["module.a", "module.b.c"]


def test_strip_prefix_strict_names_missing_keys_and_fix():
    with pytest.raises(MissingPrefixError, match=r"2 of 3 keys do not start with prefix='module\.': 'x', 'y'.*strict=False"):
        strip_prefix("module.")({"module.a": 1, "x": 2, "y": 3})


def test_strip_prefix_non_strict_keeps_unprefixed_keys():
    assert strip_prefix("module.", strict=False)({"module.a": 1, "b": 2}) == {"a": 1, "b": 2}


def test_strip_prefix_rejects_collision_naming_both_keys():
    with pytest.raises(KeyCollisionError, match=r"'module\.a' and 'a' both map to 'a'"):
        strip_prefix("module.", strict=False)({"module.a": 1, "a": 2})


def test_add_prefix_and_inverse():
    t = add_prefix("model.")
    assert t({"w": 1}) == {"model.w": 1}
    assert t.inverse() == strip_prefix("model.")
    assert strip_prefix("x.").inverse() == add_prefix("x.")


def test_non_strict_strip_prefix_has_no_inverse():
    with pytest.raises(NotInvertibleError, match=r"strip_prefix\('m\.', strict=False\)\.inverse\(\)"):
        strip_prefix("m.", strict=False).inverse()


def test_rename_by_mapping_keeps_other_keys_and_order():
    out = rename({"a": "z"})({"a": 1, "b": 2, "c": 3})
    assert list(out.items()) == [("z", 1), ("b", 2), ("c", 3)]


def test_rename_mapping_inverse():
    t = rename({"a": "x", "b": "y"})
    assert t.inverse()(t({"a": 1, "b": 2, "c": 3})) == {"a": 1, "b": 2, "c": 3}


def test_rename_mapping_with_shared_target_has_no_inverse():
    with pytest.raises(KeyCollisionError, match=r"'a' and 'b' both map to 'x'"):
        rename({"a": "x", "b": "x"}).inverse()


def test_rename_by_regex_applies_rules_in_order():
    t = rename([(r"^layers\.(\d+)\.", r"blocks.\1."), (r"\.attn\.", ".attention.")])
    assert t({"layers.3.attn.w": 1, "norm.w": 2}) == {"blocks.3.attention.w": 1, "norm.w": 2}


def test_rename_regex_collision_names_both_keys():
    with pytest.raises(KeyCollisionError, match=r"'a\.w' and 'b\.w' both map to 'x\.w'"):
        rename([(r"^[ab]\.", "x.")])({"a.w": 1, "b.w": 2})


def test_rename_regex_has_no_inverse():
    with pytest.raises(NotInvertibleError):
        rename([("a", "b")]).inverse()


def test_rename_rejects_bad_rules():
    with pytest.raises(InvalidRuleError, match=r"rule \('\(', 'x'\): the pattern is not a valid regular expression"):
        rename([("(", "x")])
    with pytest.raises(TypeError, match="pair"):
        rename([("a", "b", "c")])
    with pytest.raises(TypeError, match="rules must be a mapping"):
        rename("a")


@pytest.mark.parametrize(
    "rule, problem, groups",
    [
        (("model", r"\2"), "invalid group reference 2 at position 1", r"has no group"),
        ((r"^(?P<block>\d+)\.(\w+)$", r"\g<name>"), "unknown group name 'name'", r"has 2 group\(s\): \\1 to \\2, \\g<block>,"),
        ((r"^(\d+)\.", "x\\"), "bad escape", r"has 1 group\(s\)"),
    ],
)
def test_rename_checks_the_replacement_against_its_pattern_when_built(rule, problem, groups):
    with pytest.raises(InvalidRuleError, match=rf"^rename: rule {re.escape(repr(rule))}: the replacement is invalid for this pattern: {problem}.* The pattern {groups}"):
        rename([rule])


def test_select_and_drop_by_prefix_and_predicate():
    sd = {"enc.w": 1, "enc.b": 2, "dec.w": 3}
    assert select_keys("enc.")(sd) == {"enc.w": 1, "enc.b": 2}
    assert drop_keys("enc.")(sd) == {"dec.w": 3}
    assert select_keys(where=lambda k: k.endswith(".w"))(sd) == {"enc.w": 1, "dec.w": 3}
    assert drop_keys("enc.", "dec.")(sd) == {}


def test_a_positional_predicate_works_like_where():
    sd = {"enc.w": 1, "enc.b": 2, "dec.w": 3}
    ends_w = lambda k: k.endswith(".w")  # noqa: E731
    assert select_keys(ends_w)(sd) == select_keys(where=ends_w)(sd) == {"enc.w": 1, "dec.w": 3}
    assert drop_keys(ends_w)(sd) == {"enc.b": 2}
    assert repr(select_keys(ends_w)) == f"select_keys(where={ends_w!r})"
    with pytest.raises(TypeError, match="exactly one"):
        select_keys(ends_w, where=ends_w)
    with pytest.raises(TypeError, match="every prefix must be a str"):
        select_keys("enc.", ends_w)


def test_select_keys_needs_exactly_one_criterion():
    with pytest.raises(TypeError, match="exactly one"):
        select_keys()
    with pytest.raises(TypeError, match="exactly one"):
        select_keys("a", where=lambda k: True)


def test_drop_meta_tensors():
    sd = {"a": torch.empty(2, device="meta"), "b": torch.ones(1), "c": 3}
    assert list(drop_meta_tensors()(sd)) == ["b", "c"]
    osd = {"state": {"w": {"m": torch.empty(1, device="meta"), "step": 1}}, "param_groups": [{"params": ["w"]}]}
    assert drop_meta_tensors()(osd)["state"] == {"w": {"step": 1}}


@pytest.mark.parametrize("name", sorted(MODEL_STATE_DICTS))
def test_add_then_strip_prefix_round_trips_corpus(name):
    sd = MODEL_STATE_DICTS[name]
    out = add_prefix("p.")(sd)
    assert list(out) == ["p." + k for k in sd]
    back = strip_prefix("p.")(out)
    assert list(back) == list(sd)
    assert all(back[k] is sd[k] for k in sd)


def test_key_transform_rejects_non_mapping():
    with pytest.raises(NotAMappingError, match=r"strip_prefix: expected a state dict \(a Mapping\), got list"):
        strip_prefix("a")([1, 2])


def test_key_transform_rejects_non_string_keys():
    with pytest.raises(NonStringKeyError, match=r"1 key\(s\) are not strings: 3"):
        add_prefix("a.")({"x": 1, 3: 2})


def test_errors_are_sdtree_errors_and_builtins():
    assert issubclass(KeyCollisionError, SdtreeError) and issubclass(KeyCollisionError, ValueError)
    assert issubclass(NonStringKeyError, TypeError)
    assert not issubclass(KeyCollisionError, KeyError)


# -- the same transforms on optimizer state dicts --------------------------


def _osd():
    return {
        "state": {"module.a.w": {"step": 1, "m": torch.ones(2)}, "module.b.w": {"step": 1}},
        "param_groups": [
            {"lr": 0.1, "params": ["module.a.w", "module.c.w"]},
            {"lr": 0.2, "params": ["module.b.w"]},
        ],
    }


def test_strip_prefix_renames_optimizer_state_and_params_together():
    out = strip_prefix("module.")(_osd())
    assert list(out["state"]) == ["a.w", "b.w"]
    assert [g["params"] for g in out["param_groups"]] == [["a.w", "c.w"], ["b.w"]]
    assert [g["lr"] for g in out["param_groups"]] == [0.1, 0.2]


def test_select_keys_filters_optimizer_state_and_params():
    out = (strip_prefix("module.") >> drop_keys("b."))(_osd())
    assert list(out["state"]) == ["a.w"]
    assert [g["params"] for g in out["param_groups"]] == [["a.w", "c.w"], []]


def test_rename_on_flat_optimizer_renames_fqn_part_only():
    flat = flatten_optimizer()(_osd())
    out = rename({"module.a.w": "encoder.w"})(flat)
    assert "state.encoder.w.step" in out and "param_groups.encoder.w.lr" in out
    assert "state.module.b.w.step" in out
    assert strip_prefix("module.", strict=False)(flat).keys() == flatten_optimizer()(
        strip_prefix("module.")(_osd())
    ).keys()


def test_key_transform_on_int_keyed_optimizer_points_to_param_ids_to_fqns():
    osd = {"state": {0: {}}, "param_groups": [{"params": [0]}]}
    with pytest.raises(NonStringKeyError, match=r"apply param_ids_to_fqns"):
        strip_prefix("a")(osd)


def test_optimizer_collision_names_both_fqns():
    with pytest.raises(KeyCollisionError, match=r"'module\.a\.w' and 'module\.b\.w' both map to 'w'"):
        rename([(r"^module\.[ab]\.", "")])(_osd())


def test_flat_optimizer_state_key_without_param_group_is_an_error():
    flat = {"state.a.step": 1, "param_groups.b.lr": 0.1}
    with pytest.raises(LayoutMismatchError, match=re.escape("'state.a.step' belongs to no parameter")):
        add_prefix("x.")(flat)


def test_key_transforms_take_model_and_optimizer_pairs_like_the_tensor_transforms():
    from sdtree.transforms import fuse

    model = {"l.0.q": torch.zeros(2), "l.0.k": torch.ones(2)}
    optim = {"state": {k: {"exp_avg": v + 1} for k, v in model.items()}, "param_groups": [{"params": list(model), "lr": 0.1}]}
    t = rename({"l.{i}.q": "layers.{i}.q", "l.{i}.k": "layers.{i}.k"})
    out_model, out_optim = t((model, optim))
    assert list(out_model) == ["layers.0.q", "layers.0.k"] and out_model["layers.0.q"] is model["l.0.q"]
    assert out_optim == t(optim)
    fused_model, fused_optim = (t >> fuse(["layers.{i}.q", "layers.{i}.k"], "layers.{i}.qk"))((model, optim))
    assert list(fused_model) == ["layers.0.qk"] and fused_optim["param_groups"][0]["params"] == ["layers.0.qk"]
    with pytest.raises(LayoutMismatchError, match=r"the second of \(model_state_dict, optim_state_dict\) is not an optimizer"):
        t((model, model))
    dropped_model, dropped_optim = drop_meta_tensors()(({**model, "m": torch.empty(1, device="meta")}, optim))
    assert list(dropped_model) == list(model) and dropped_optim == drop_meta_tensors()(optim)
