"""Law: a transform never silently merges keys; a collision raises and names both keys."""

import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sdtree.errors import KeyCollisionError
from sdtree.transforms import Transform, rename, strip_prefix

from .strategies import fqn_optimizer_state_dicts, key_transforms, state_dicts


@given(state_dicts(min_size=2), st.data())
def test_rename_onto_an_existing_key_raises_naming_both(sd, data):
    old, target = data.draw(st.lists(st.sampled_from(list(sd)), min_size=2, max_size=2, unique=True))
    with pytest.raises(KeyCollisionError, match=re.escape(f"both map to {target!r}")) as info:
        rename({old: target})(sd)
    assert repr(old) in str(info.value) and repr(target) in str(info.value)


def _keeps_or_drops_but_never_merges(sd, t):
    """The law: every key survives as one key or is dropped; a collision is
    the only error the law allows (anything else raised fails it)."""
    try:
        out = t(sd)
    except KeyCollisionError:
        return
    if "state" in out and "param_groups" in out:
        names = [k for g in out["param_groups"] for k in g["params"]]
        before = [k for g in sd["param_groups"] for k in g["params"]]
        assert len(names) == len(set(names)) and len(names) <= len(before)
        assert len(out["state"]) <= len(sd["state"])
        assert set(out["state"]) <= set(names)
    else:
        kept = [k for k in sd if t(dict.fromkeys([k], 0))]
        assert len(out) == len(kept)


@given(st.one_of(state_dicts(), fqn_optimizer_state_dicts()), key_transforms)
def test_key_transforms_keep_or_drop_but_never_merge(sd, t):
    _keeps_or_drops_but_never_merges(sd, t)


class _MergesSilently(Transform):
    def __call__(self, sd):
        return {"merged": v for v in sd.values()} if "state" not in sd else sd


class _Crashes(Transform):
    def __call__(self, sd):
        raise RuntimeError("a bug")


class _DuplicatesParams(Transform):
    def __call__(self, osd):
        return {**osd, "param_groups": [{**g, "params": g["params"] * 2} for g in osd["param_groups"]]}


def test_the_law_fails_for_a_transform_that_merges_crashes_or_duplicates():
    sd = {"a.w": 1, "b.w": 2}
    osd = {"state": {"w": {"step": 1}}, "param_groups": [{"params": ["w"], "lr": 0.1}]}
    with pytest.raises(AssertionError):
        _keeps_or_drops_but_never_merges(sd, _MergesSilently())
    with pytest.raises(RuntimeError, match="a bug"):
        _keeps_or_drops_but_never_merges(sd, _Crashes())
    with pytest.raises(AssertionError):
        _keeps_or_drops_but_never_merges(osd, _DuplicatesParams())
    _keeps_or_drops_but_never_merges(sd, rename({"a.w": "b.w"}))  # a collision that raises is lawful


@given(state_dicts(min_size=1))
def test_strip_prefix_collision_with_unprefixed_key(sd):
    key = next(iter(sd))
    with pytest.raises(KeyCollisionError, match=re.escape(f"'p.{key}' and {key!r} both map to {key!r}")):
        strip_prefix("p.", strict=False)({f"p.{key}": 1, **sd})
