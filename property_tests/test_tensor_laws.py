"""Laws of the tensor transforms (fuse/split, stack/unstack, rotary
permutations, transpose, reshape, cast), on model state dicts, FQN-keyed and
flat optimizer state dicts and (model, optim) pairs."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from sdtree.errors import TensorMismatchError
from sdtree.testing import assert_state_dict_equal, fusable_state_dicts, stackable_state_dicts
from sdtree.transforms import (
    add_prefix,
    cast,
    flatten_optimizer,
    permute_for_rope,
    reshape,
    strip_prefix,
    transpose,
)
from sdtree.transforms.patterns import key_pattern
from sdtree.transforms.plans import materialize

from .snapshot import assert_unchanged, snapshot

FAMILIES = st.one_of(fusable_state_dicts(), stackable_state_dicts())


def _assert_same(actual, expected):
    """Equal keys in the same order at every level, bitwise-equal values."""
    assert_state_dict_equal(actual, expected)
    if isinstance(actual, tuple):
        for a, b in zip(actual, expected):
            _assert_same(a, b)
    elif "state" in actual and "param_groups" in actual:
        assert list(actual["state"]) == list(expected["state"])
        assert [g["params"] for g in actual["param_groups"]] == [g["params"] for g in expected["param_groups"]]
    else:
        assert list(actual) == list(expected)


def _forms(model, optim):
    return [model, optim, flatten_optimizer()(optim), (model, optim)]


def _unknowable(rule, sd):
    """An unstack of an optimizer state dict alone, where a stacked parameter
    has no state: the number of experts is nowhere to be read (an error)."""
    if rule._factory != "unstack" or isinstance(sd, tuple) or "state" not in sd and not any(k.startswith("param_groups.") for k in sd):
        return False
    stacked = key_pattern(rule.source)
    if "state" in sd:
        params = [k for g in sd["param_groups"] for k in g["params"] if stacked.match(k)]
        return any(k not in sd["state"] for k in params)
    params = {k[len("param_groups."):].rpartition(".")[0] for k in sd if k.startswith("param_groups.")}
    return any(stacked.match(p) and not any(k.startswith(f"state.{p}.") for k in sd) for p in params)


@st.composite
def _unary_cases(draw):
    """A fusable family and an invertible one-key rule that applies to it."""
    model, optim, rule = draw(fusable_state_dicts())
    pattern = rule.sources[0]  # '<prefix>.{i}.p0.w'
    sample = next(v for k, v in model.items() if key_pattern(pattern).match(k))
    choices = [reshape(pattern, (sample.numel(),), from_shape=tuple(sample.shape))]
    if sample.dim() >= 2:
        choices.append(transpose(pattern, 0, -1))
    if sample.dtype != torch.float64:
        choices.append(cast(torch.float64, where=pattern, from_dtype=sample.dtype))
    if sample.shape[0] % 2 == 0:
        choices.append(permute_for_rope(pattern, n_heads=sample.shape[0] // 2))
    return model, optim, draw(st.sampled_from(choices))


@given(st.one_of(FAMILIES, _unary_cases()))
def test_every_inverse_pair_round_trips_bitwise(case):
    model, optim, rule = case
    inverse = rule.inverse()
    for sd in _forms(model, optim):
        done = rule(sd)
        if _unknowable(inverse, done):
            with pytest.raises(TensorMismatchError, match="number of outputs is unknown"):
                inverse(done)
            continue
        _assert_same(inverse(done), sd)


@given(FAMILIES)
def test_the_inverse_then_the_rule_is_the_identity_too(case):
    model, optim, rule = case  # split then fuse, unstack then stack
    for sd in _forms(model, optim):
        done = rule(sd)
        if _unknowable(rule.inverse(), done):
            continue
        _assert_same(rule(rule.inverse()(done)), done)


@given(fusable_state_dicts(), stackable_state_dicts())
def test_transforms_on_distinct_keys_commute(fusable, stackable):
    (m1, o1, a), (m2, o2, b) = fusable, stackable
    theirs = lambda k: not k.startswith("other.")  # noqa: E731  # both families have unrelated 'other.' keys
    model = {**m1, **{k: v for k, v in m2.items() if theirs(k)}}
    optim = {
        "state": {**o1["state"], **{k: v for k, v in o2["state"].items() if theirs(k)}},
        "param_groups": o1["param_groups"] + [{**g, "params": [k for k in g["params"] if theirs(k)]} for g in o2["param_groups"]],
    }
    for sd in _forms(model, optim):
        _assert_same((a >> b)(sd), (b >> a)(sd))


def _by_hand(rule, optim):
    """The optimizer state a fuse or stack should give, written out: each
    group's moments concatenated (or stacked) as its parameters, step kept."""
    if hasattr(rule, "over"):
        source, target = key_pattern(rule.source), key_pattern(rule.target)
        combine = lambda ts: torch.stack(ts, rule.dim)  # noqa: E731
    else:
        source, target = key_pattern(rule.sources[0]), key_pattern(rule.target)
        combine = lambda ts: torch.cat(ts, rule.dim)  # noqa: E731
    groups = {}
    for key in [k for g in optim["param_groups"] for k in g["params"]]:
        binding = source.match(key)
        if binding is None and hasattr(rule, "over"):
            continue
        if binding is None:  # a later source of a fuse: p1, p2, ...
            binding = next((b for p in rule.sources[1:] if (b := key_pattern(p).match(key)) is not None), None)
        if binding is not None:
            groups.setdefault(target.format(binding), []).append(key)
    members_of = {t: sorted(ks, key=lambda k: int(k.split(".")[-2]) if hasattr(rule, "over") else k) for t, ks in groups.items()}
    state = {}
    done = set()
    for key, entry in optim["state"].items():
        target = next((t for t, ks in members_of.items() if key in ks), None)
        if target is None:
            state[key] = entry
        elif target not in done:
            done.add(target)
            entries = [optim["state"][k] for k in members_of[target]]
            state[target] = {
                "step": entries[0]["step"],
                "exp_avg": combine([e["exp_avg"] for e in entries]),
                "exp_avg_sq": combine([e["exp_avg_sq"] for e in entries]),
            }
    return state


@given(FAMILIES)
def test_a_pair_agrees_with_the_model_alone_and_the_optimizer_mapped_by_hand(case):
    model, optim, rule = case
    out_model, out_optim = rule((model, optim))
    _assert_same(out_model, rule(model))
    assert_state_dict_equal(out_optim["state"], _by_hand(rule, optim))
    fused_params = [k for g in out_optim["param_groups"] for k in g["params"]]
    assert set(fused_params) == {k for k in out_model}
    _assert_same(out_optim, rule(optim))


@given(st.one_of(FAMILIES, _unary_cases()))
def test_tensor_transforms_leave_their_inputs_untouched(case):
    model, optim, rule = case
    pair = (model, optim)
    before = snapshot(pair)
    for sd in _forms(model, optim):
        done = rule(sd)
        if not _unknowable(rule.inverse(), done):
            rule.inverse()(done)
    assert_unchanged(before, pair)


@given(st.one_of(FAMILIES, _unary_cases()))
def test_meta_tensors_plan_what_real_tensors_give(case):
    model, optim, rule = case
    meta = {k: torch.empty(v.shape, dtype=v.dtype, device="meta") for k, v in model.items()}
    real = rule(model)
    names = {id(t): k for k, t in meta.items()}
    # alone, and inside a pipeline, where the rule plans pending outputs that the pipeline settles
    for planned in (rule(meta), (rule >> add_prefix("p.") >> strip_prefix("p."))(meta)):
        assert list(planned) == list(real)
        for key, value in planned.items():
            assert value.is_meta and (value.shape, value.dtype) == (real[key].shape, real[key].dtype), key
            assert torch.equal(materialize(value, lambda t: model[names[id(t)]]), real[key]), key
