"""Tensor transforms on model state dicts, optimizer state dicts (FQN-keyed
and flat), (model, optim) pairs and meta tensors; their errors and inverses."""

import re

import pytest
import torch

from sdtree.errors import (
    KeyCollisionError,
    LayoutMismatchError,
    NotInvertibleError,
    PatternMatchError,
    TensorMismatchError,
    UnsupportedLeafError,
)
from sdtree.testing import assert_state_dict_equal
from sdtree.transforms import (
    cast,
    flatten_optimizer,
    fuse,
    map_tensors,
    permute_for_rope,
    rename,
    reshape,
    split,
    stack,
    transpose,
    unpermute_for_rope,
    unstack,
)
from sdtree.transforms.rules import Materializer, derivation_of, materialize

QKV = fuse(["l.{i}.q", "l.{i}.k", "l.{i}.v"], "l.{i}.qkv", sizes=(4, 2, 2))


def _model(layers=2):
    g = torch.Generator().manual_seed(0)
    sd = {}
    for i in range(layers):
        sd[f"l.{i}.q"] = torch.randn(4, 3, generator=g)
        sd[f"l.{i}.k"] = torch.randn(2, 3, generator=g)
        sd[f"l.{i}.v"] = torch.randn(2, 3, generator=g)
        sd[f"l.{i}.o"] = torch.randn(3, 4, generator=g)
    sd["norm"] = torch.ones(3)
    return sd


def _adam(model, step=3.0):
    return {
        "state": {k: {"step": torch.tensor(step), "exp_avg": v * 2, "exp_avg_sq": v * v} for k, v in model.items()},
        "param_groups": [{"params": list(model), "lr": 0.1, "betas": (0.9, 0.99)}],
    }


def test_fuse_concatenates_each_group_in_place_of_its_first_source():
    sd = _model()
    out = QKV(sd)
    assert list(out) == ["l.0.qkv", "l.0.o", "l.1.qkv", "l.1.o", "norm"]
    assert torch.equal(out["l.1.qkv"], torch.cat([sd["l.1.q"], sd["l.1.k"], sd["l.1.v"]]))
    assert out["norm"] is sd["norm"]


def test_fuse_then_split_is_the_identity_bitwise():
    sd = _model()
    back = QKV.inverse()(QKV(sd))
    assert list(back) == list(sd)
    for key in sd:
        assert torch.equal(back[key], sd[key]) and back[key].is_contiguous()
        assert back[key].untyped_storage().data_ptr() != sd[key].untyped_storage().data_ptr() or back[key] is sd[key]


def test_split_into_equal_parts_and_along_another_dim():
    w = torch.arange(12.0).reshape(2, 6)
    out = split("w", ["a", "b", "c"], dim=1)({"w": w})
    assert [tuple(v.shape) for v in out.values()] == [(2, 2)] * 3
    assert torch.equal(out["b"], w[:, 2:4]) and out["b"].is_contiguous()
    assert split("w", ["a", "b"], sizes=(1, 5), dim=-1).inverse()(split("w", ["a", "b"], sizes=(1, 5), dim=-1)({"w": w}))["w"].equal(w)


def test_fuse_without_sizes_has_no_inverse():
    t = fuse(["a.{i}", "b.{i}"], "c.{i}")
    with pytest.raises(NotInvertibleError, match=r"sizes="):
        t.inverse()


def test_optimizer_moments_follow_and_step_is_carried():
    sd = _model()
    osd = _adam(sd)
    out = QKV(osd)
    assert list(out["state"]) == ["l.0.qkv", "l.0.o", "l.1.qkv", "l.1.o", "norm"]
    assert out["param_groups"] == [{"params": list(out["state"]), "lr": 0.1, "betas": (0.9, 0.99)}]
    entry = out["state"]["l.0.qkv"]
    assert list(entry) == ["step", "exp_avg", "exp_avg_sq"]
    assert torch.equal(entry["exp_avg"], torch.cat([sd["l.0.q"], sd["l.0.k"], sd["l.0.v"]]) * 2)
    assert entry["step"] is osd["state"]["l.0.q"]["step"]
    assert_state_dict_equal(QKV.inverse()(out), osd)


def test_flat_optimizer_form_behaves_the_same():
    osd = _adam(_model())
    flat = flatten_optimizer()(osd)
    assert_state_dict_equal(QKV(flat), flatten_optimizer()(QKV(osd)))
    assert_state_dict_equal(QKV.inverse()(QKV(flat)), flat)


def test_model_and_optimizer_together_agree_with_each_alone():
    sd = _model()
    osd = _adam(sd)
    model_out, optim_out = QKV((sd, osd))
    assert_state_dict_equal(model_out, QKV(sd))
    assert_state_dict_equal(optim_out, QKV(osd))


def test_fusing_parameters_whose_step_differ_is_an_error_naming_them():
    sd = _model(1)
    osd = _adam(sd)
    osd["state"]["l.0.k"]["step"] = torch.tensor(4.0)
    with pytest.raises(TensorMismatchError, match=r"entry 'step' differs within the group \('l.0.q' has 3.0, 'l.0.k' has 4.0, 'l.0.v' has 3.0\)"):
        QKV(osd)


def test_sources_in_different_param_groups_are_an_error_naming_the_groups():
    sd = _model(1)
    osd = _adam(sd)
    osd["param_groups"] = [{"params": ["l.0.q", "l.0.v", "l.0.o", "norm"], "lr": 0.1}, {"params": ["l.0.k"], "lr": 0.2}]
    with pytest.raises(LayoutMismatchError, match=r"different param groups \('l.0.q' in 0, 'l.0.k' in 1, 'l.0.v' in 0\)"):
        QKV(osd)
    flat = flatten_optimizer()(osd)
    with pytest.raises(LayoutMismatchError, match=r"'l.0.q' and 'l.0.k' are in different param groups"):
        QKV(flat)


def test_optimizer_entries_of_other_shapes_are_an_error_unless_dropped():
    sd = {"a.q": torch.zeros(2, 3), "a.k": torch.zeros(2, 3)}
    osd = {
        "state": {k: {"step": torch.tensor(1.0), "row_var": torch.zeros(2, 1), "col_var": torch.zeros(1, 3)} for k in sd},
        "param_groups": [{"params": list(sd), "lr": 1e-2}],
    }
    t = fuse(["{m}.q", "{m}.k"], "{m}.qk")
    with pytest.raises(TensorMismatchError, match=r"entries of 'a.q' have different shapes \(row_var \(2, 1\), col_var \(1, 3\)\)"):
        t(osd)
    with pytest.raises(TensorMismatchError, match=r"optimizer entry 'row_var' is not shaped like its parameter .*other_entries='drop'"):
        t((sd, osd))
    dropped = fuse(["{m}.q", "{m}.k"], "{m}.qk", other_entries="drop")((sd, osd))[1]
    assert list(dropped["state"]["a.qk"]) == ["step"]


def test_no_match_is_an_error_naming_the_rule_and_nearest_keys():
    with pytest.raises(PatternMatchError, match=re.escape("fuse(('x.{i}.q', 'x.{i}.k'), 'x.{i}.qk'): no key matches 'x.{i}.q', 'x.{i}.k'; the nearest keys are")):
        fuse(["x.{i}.q", "x.{i}.k"], "x.{i}.qk")(_model())
    assert fuse(["x.{i}.q", "x.{i}.k"], "x.{i}.qk", strict=False)(_model()).keys() == _model().keys()


def test_incomplete_group_is_an_error():
    sd = _model(1)
    del sd["l.0.v"]
    with pytest.raises(PatternMatchError, match=r"at \{i\}=0: found 'l.0.q', 'l.0.k' but not 'l.0.v'"):
        QKV(sd)


def test_bad_input_is_refused_with_the_input_untouched():
    sd = _model(1)
    before = {k: v.clone() for k, v in sd.items()}
    bad = {**sd, "l.0.k": torch.zeros(2, 5)}
    with pytest.raises(TensorMismatchError, match=r"differ outside dim 0 \('l.0.q' \(4, 3\), 'l.0.k' \(2, 5\), 'l.0.v' \(2, 3\)\)"):
        QKV(bad)
    with pytest.raises(TensorMismatchError, match=r"sizes=\(4, 2, 2\) but the sources have \(4, 1, 2\)"):
        QKV({**sd, "l.0.k": torch.zeros(1, 3)})
    with pytest.raises(TensorMismatchError, match=r"differ in dtype"):
        QKV({**sd, "l.0.k": sd["l.0.k"].double()})
    with pytest.raises(UnsupportedLeafError, match=r"'l.0.k' \(int\) is not a tensor"):
        QKV({**sd, "l.0.k": 3})
    with pytest.raises(ValueError, match=r"must have the same placeholders"):
        fuse(["l.{i}.q", "l.{j}.k"], "l.{i}.qk")
    with pytest.raises(TensorMismatchError, match=r"does not split into 3 equal parts"):
        split("l.{i}.q", ["l.{i}.a", "l.{i}.b", "l.{i}.c"])(sd)
    for key in sd:
        assert torch.equal(sd[key], before[key]) and sd[key]._version == 0


def test_target_that_exists_already_is_a_collision():
    sd = {**_model(1), "l.0.qkv": torch.zeros(1)}
    with pytest.raises(KeyCollisionError, match=r"'l.0.qkv'"):
        QKV(sd)


def test_stack_orders_by_integer_index_and_unstack_restores_it():
    sd = {f"l.0.experts.{e}.w1": torch.full((2,), float(e)) for e in (10, 2, 0, 1, 3, 4, 5, 6, 7, 8, 9)}
    t = stack("l.{i}.experts.{e}.w1", "l.{i}.experts.w1", over="e")
    out = t(sd)
    assert list(out) == ["l.0.experts.w1"] and out["l.0.experts.w1"][:, 0].tolist() == list(map(float, range(11)))
    back = t.inverse()(out)
    assert sorted(back) == sorted(sd) and all(torch.equal(back[k], sd[k]) for k in sd)


def test_stack_refuses_gaps_repeats_and_non_integers():
    t = stack("e.{n}.w", "w", over="n")
    with pytest.raises(PatternMatchError, match=r"indices \[0, 2\] are not 0..1 \(missing \[1\]\)"):
        t({"e.0.w": torch.zeros(1), "e.2.w": torch.zeros(1)})
    with pytest.raises(PatternMatchError, match=r"'e.1.w' and 'e.01.w' both have \{n\} index 1"):
        t({"e.0.w": torch.zeros(1), "e.1.w": torch.zeros(1), "e.01.w": torch.zeros(1)})
    with pytest.raises(PatternMatchError, match=r"\{n\} is 'x', not an integer index"):
        t({"e.x.w": torch.zeros(1)})
    with pytest.raises(TensorMismatchError, match=r"one shape"):
        t({"e.0.w": torch.zeros(1), "e.1.w": torch.zeros(2)})


def _hf_permute(w, n_heads, dim1, dim2):
    """The permutation of Hugging Face's convert_llama_weights_to_hf.py."""
    return w.view(n_heads, dim1 // n_heads // 2, 2, dim2).transpose(1, 2).reshape(dim1, dim2)


def test_permute_for_rope_is_hugging_faces_permutation_and_unpermute_inverts_it():
    w = torch.randn(32, 16)
    out = permute_for_rope("q", n_heads=4)({"q": w})["q"]
    assert torch.equal(out, _hf_permute(w, 4, 32, 16))
    assert torch.equal(unpermute_for_rope("q", n_heads=4)({"q": out})["q"], w)
    assert permute_for_rope("q", n_heads=4).inverse() == unpermute_for_rope("q", n_heads=4)
    bias = torch.arange(8.0)
    assert torch.equal(unpermute_for_rope("b", n_heads=2).inverse()({"b": bias})["b"], torch.tensor([0.0, 2, 1, 3, 4, 6, 5, 7]))


def test_permute_for_rope_checks_heads_and_head_dim():
    with pytest.raises(TensorMismatchError, match=r"'q' \(30, 4\): dim 0 is 30, which does not divide by n_heads=4"):
        permute_for_rope("q", n_heads=4)({"q": torch.zeros(30, 4)})
    with pytest.raises(TensorMismatchError, match=r"head_dim=3 is odd"):
        permute_for_rope("q", n_heads=2)({"q": torch.zeros(6, 4)})
    with pytest.raises(TensorMismatchError, match=r"not n_heads=2 x head_dim=4"):
        permute_for_rope("q", n_heads=2, head_dim=4)({"q": torch.zeros(6, 4)})
    with pytest.raises(ValueError, match=r"head_dim must be a positive even int"):
        permute_for_rope("q", n_heads=2, head_dim=3)


def test_transpose_reshape_and_their_inverses():
    w = torch.arange(6.0).reshape(2, 3)
    t = transpose("w", 0, 1)
    assert t.inverse() is t and torch.equal(t(t({"w": w}))["w"], w)
    r = reshape("w", (3, 2), from_shape=(2, 3))
    assert torch.equal(r.inverse()(r({"w": w}))["w"], w)
    with pytest.raises(NotInvertibleError, match="from_shape"):
        reshape("w", (3, 2)).inverse()
    with pytest.raises(TensorMismatchError, match=r"cannot be reshaped to \(4, 2\)"):
        reshape("w", (4, 2))({"w": w})
    with pytest.raises(TensorMismatchError, match=r"not from_shape=\(3, 2\)"):
        reshape("w", (6,), from_shape=(3, 2))({"w": w})
    with pytest.raises(ValueError, match="would change nothing"):
        transpose("w", 1, 1)


def test_cast_is_lossy_unless_declared_an_exact_widening():
    sd = {"w": torch.randn(3).bfloat16(), "n": torch.tensor([2])}
    up = cast(torch.float32, from_dtype=torch.bfloat16)
    out = up(sd)
    assert out["w"].dtype == torch.float32 and out["n"] is sd["n"]
    assert torch.equal(up.inverse()(out)["w"], sd["w"])
    with pytest.raises(NotInvertibleError, match="from_dtype"):
        cast(torch.bfloat16).inverse()
    with pytest.raises(NotInvertibleError, match="from_dtype"):
        cast(torch.bfloat16, from_dtype=torch.float32).inverse()
    with pytest.raises(TensorMismatchError, match=r"'n' is torch.int64: integer and bool tensors are not cast"):
        cast(torch.float16, where="n")(sd)
    with pytest.raises(TensorMismatchError, match=r"'w' is torch.bfloat16, not from_dtype=torch.float16"):
        cast(torch.float32, from_dtype=torch.float16)(sd)
    with pytest.raises(PatternMatchError, match="selects no key"):
        cast(torch.float32)({"n": torch.tensor([1])})


def test_cast_of_an_optimizer_casts_moments_and_keeps_step():
    osd = _adam({"w": torch.ones(2)})
    out = cast(torch.bfloat16)(osd)
    assert out["state"]["w"]["exp_avg"].dtype == torch.bfloat16 and out["state"]["w"]["step"].dtype == torch.float32


def test_map_tensors_with_and_without_inverse():
    sd = {"a.w": torch.ones(2), "a.b": torch.ones(2), "n": 3}
    t = map_tensors(torch.neg, where=lambda k: k.endswith(".w"), inverse=torch.neg)
    out = t(sd)
    assert out["a.w"].tolist() == [-1.0, -1.0] and out["a.b"] is sd["a.b"] and out["n"] == 3
    assert torch.equal(t.inverse()(out)["a.w"], sd["a.w"])
    with pytest.raises(NotInvertibleError, match="inverse="):
        map_tensors(torch.neg).inverse()


def test_meta_tensors_are_planned_and_materialised_later():
    sd = _model()
    meta = {k: torch.empty(v.shape, dtype=v.dtype, device="meta") for k, v in sd.items()}
    by_id = {id(m): sd[k] for k, m in meta.items()}
    t = QKV >> permute_for_rope("l.{i}.qkv", n_heads=2) >> cast(torch.bfloat16, where="l.{i}.qkv")
    planned = t(meta)
    real = t(sd)
    assert list(planned) == list(real)
    for key, value in planned.items():
        assert value.is_meta and value.shape == real[key].shape and value.dtype == real[key].dtype
        assert torch.equal(materialize(value, lambda m: by_id[id(m)]), real[key])
    assert derivation_of(planned["norm"]) is None


def test_pattern_rename_and_its_inverse_on_model_and_optimizer():
    t = rename({"model.layers.{i}.mlp.up_proj.weight": "layers.{i}.feed_forward.w3.weight", "lm_head.weight": "output.weight"})
    sd = {"model.layers.0.mlp.up_proj.weight": 1, "model.layers.1.mlp.up_proj.weight": 2, "lm_head.weight": 3, "x": 4}
    out = t(sd)
    assert out == {"layers.0.feed_forward.w3.weight": 1, "layers.1.feed_forward.w3.weight": 2, "output.weight": 3, "x": 4}
    assert t.inverse()(out) == sd
    osd = {"state": {k: {"step": 1} for k in sd}, "param_groups": [{"params": list(sd)}]}
    assert list(t(osd)["state"]) == list(out)
    with pytest.raises(ValueError, match="both sides need the same placeholders"):
        rename({"a.{i}": "b"})


def test_reprs_are_the_calls():
    assert repr(QKV) == "fuse(('l.{i}.q', 'l.{i}.k', 'l.{i}.v'), 'l.{i}.qkv', sizes=(4, 2, 2))"
    assert repr(QKV.inverse()) == "split('l.{i}.qkv', ('l.{i}.q', 'l.{i}.k', 'l.{i}.v'), sizes=(4, 2, 2))"
    assert repr(stack("e.{n}.w", "w", over="n", dim=1)) == "stack('e.{n}.w', 'w', over='n', dim=1)"
    assert repr(permute_for_rope("q", n_heads=8)) == "permute_for_rope('q', n_heads=8)"
    assert repr(cast(torch.bfloat16, where="l.{i}.q")) == "cast(torch.bfloat16, where='l.{i}.q')"
    assert repr(unstack("w", "e.{n}.w", over="n")) == "unstack('w', 'e.{n}.w', over='n')"


def test_fuse_of_equal_parts_inverts_to_an_equal_split():
    t = fuse(["{m}.w1", "{m}.w3"], "{m}.w13", sizes="equal")
    sd = {"f.w1": torch.zeros(2, 3), "f.w3": torch.ones(2, 3)}
    assert t.inverse() == split("{m}.w13", ["{m}.w1", "{m}.w3"])
    assert split("{m}.w13", ["{m}.w1", "{m}.w3"]).inverse() == t
    assert_state_dict_equal(t.inverse()(t(sd)), sd)
    with pytest.raises(TensorMismatchError, match=r"sizes='equal' but the sources have \(2, 1\)"):
        t({"f.w1": torch.zeros(2, 3), "f.w3": torch.ones(1, 3)})


def test_param_names_follow_params_when_they_name_them():
    osd = _adam(_model(1))
    osd["param_groups"][0]["param_names"] = list(osd["param_groups"][0]["params"])
    out = QKV(osd)
    assert out["param_groups"][0]["param_names"] == out["param_groups"][0]["params"] == ["l.0.qkv", "l.0.o", "norm"]


def test_materializer_computes_a_split_once_and_lets_its_outputs_go():
    sd = {"w13": torch.arange(8.0).reshape(4, 2), "b": torch.ones(1)}
    meta = {k: torch.empty(v.shape, dtype=v.dtype, device="meta") for k, v in sd.items()}
    by_id = {id(meta[k]): v for k, v in sd.items()}
    reads = []

    def fetch(placeholder):
        reads.append(placeholder)
        return by_id[id(placeholder)]

    planned = split("w13", ["w1", "w3"])(meta)
    read = Materializer(planned, fetch)
    got = {k: read(v) for k, v in planned.items()}
    assert len(reads) == 2  # w13 once for both halves, b once
    assert torch.equal(got["w1"], sd["w13"][:2]) and torch.equal(got["w3"], sd["w13"][2:])
    assert read._held == {}  # nothing kept once every output was read
