"""Law: every invertible transform composed with its inverse is the identity."""

import torch
from hypothesis import assume, given
from hypothesis import strategies as st

import sdtree
from sdtree import pipeline
from sdtree.errors import KeyCollisionError
from sdtree.testing import assert_state_dict_equal
from sdtree.transforms import (
    add_prefix,
    flatten_optimizer,
    merge_optimizers,
    optimizer_layout,
    param_ids_to_fqns,
    rename,
    split_optimizer,
    strip_prefix,
    unflatten_optimizer,
)

from .strategies import fqn_optimizer_state_dicts, fqns, optimizer_state_dicts, state_dicts


@given(state_dicts(), fqns().map(lambda s: s + "."))
def test_strip_prefix_inverts_add_prefix(sd, prefix):
    t = add_prefix(prefix)
    back = t.inverse()(t(sd))
    assert list(back) == list(sd) and all(back[k] is sd[k] for k in sd)


@given(state_dicts(), fqns().map(lambda s: s + "."))
def test_add_prefix_inverts_strict_strip_prefix(sd, prefix):
    prefixed = add_prefix(prefix)(sd)
    t = strip_prefix(prefix)
    assert t.inverse()(t(prefixed)) == prefixed


@given(state_dicts(min_size=1), st.data())
def test_rename_mapping_inverse_round_trips(sd, data):
    olds = data.draw(st.lists(st.sampled_from(list(sd)), unique=True))
    news = data.draw(st.lists(fqns(), min_size=len(olds), max_size=len(olds), unique=True))
    untouched = set(sd) - set(olds)
    assume(not (set(news) & untouched))  # the inverse is exact on this domain
    t = rename(dict(zip(olds, news)))
    back = t.inverse()(t(sd))
    assert list(back) == list(sd) and all(back[k] is sd[k] for k in sd)


@given(optimizer_state_dicts(keys="int"), st.data())
def test_fqns_to_param_ids_inverts_param_ids_to_fqns(osd, data):
    ids = [k for g in osd["param_groups"] for k in g["params"]]
    names = data.draw(st.lists(fqns(), min_size=len(ids), max_size=len(ids), unique=True))
    t = param_ids_to_fqns(dict(zip(ids, names)))
    assert_state_dict_equal(t.inverse()(t(osd)), osd)


@given(optimizer_state_dicts())
def test_unflatten_optimizer_inverts_flatten_optimizer(osd):
    flat = flatten_optimizer()(osd)
    assert_state_dict_equal(unflatten_optimizer(optimizer_layout(osd))(flat), osd)


@given(st.lists(fqn_optimizer_state_dicts(max_groups=2), max_size=3))
def test_split_optimizer_inverts_merge_optimizers(osds):
    keys = [k for o in osds for g in o["param_groups"] for k in g["params"]]
    assume(len(keys) == len(set(keys)))
    merged = merge_optimizers()(osds)
    parts = split_optimizer([optimizer_layout(o) for o in osds])(merged)
    assert len(parts) == len(osds)
    for part, original in zip(parts, osds):
        assert_state_dict_equal(part, original)


@given(state_dicts(tensors_only=True, min_size=1))
def test_unflatten_state_dict_inverts_flatten_state_dict(sd):
    nested = {"model": sd, "extra": {"step": 3, "list": [torch.ones(1), 2]}}
    try:
        flat, mapping = sdtree.flatten_state_dict(nested)
    except KeyCollisionError:
        return
    assert_state_dict_equal(sdtree.unflatten_state_dict(flat, mapping), nested)


def _has_empty_container(tree):
    if isinstance(tree, (dict, list, tuple)):
        values = tree.values() if isinstance(tree, dict) else tree
        return not values or any(_has_empty_container(v) for v in values)
    return False


@given(state_dicts())
def test_unflatten_state_dict_inverts_flatten_up_to_sequence_type(sd):
    # Sequences come back as lists and empty containers vanish, as in torch;
    # without empty containers the flat form is a fixed point.
    assume(not _has_empty_container(sd) or not sd)
    try:
        flat, mapping = sdtree.flatten_state_dict(sd)
    except KeyCollisionError:
        return
    again, again_mapping = sdtree.flatten_state_dict(sdtree.unflatten_state_dict(flat, mapping))
    assert list(again) == list(flat) and again_mapping == mapping
    assert all(again[k] is flat[k] for k in flat)


@given(state_dicts(), st.lists(fqns().map(lambda s: s + "."), max_size=4))
def test_pipeline_inverse_round_trips(sd, prefixes):
    t = pipeline(*(add_prefix(p) for p in prefixes)) >> add_prefix("_orig_mod.") >> strip_prefix("_orig_mod.")
    back = t.inverse()(t(sd))
    assert list(back) == list(sd) and all(back[k] is sd[k] for k in sd)
