"""Law: a transform never silently merges keys; a collision raises and names both keys."""

import re

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from sdtree.errors import KeyCollisionError
from sdtree.transforms import rename, strip_prefix

from .strategies import fqn_optimizer_state_dicts, key_transforms, state_dicts


@given(state_dicts(min_size=2), st.data())
def test_rename_onto_an_existing_key_raises_naming_both(sd, data):
    old, target = data.draw(st.lists(st.sampled_from(list(sd)), min_size=2, max_size=2, unique=True))
    with pytest.raises(KeyCollisionError, match=re.escape(f"both map to {target!r}")) as info:
        rename({old: target})(sd)
    assert repr(old) in str(info.value) and repr(target) in str(info.value)


@given(st.one_of(state_dicts(), fqn_optimizer_state_dicts()), key_transforms)
def test_key_transforms_keep_or_drop_but_never_merge(sd, t):
    try:
        out = t(sd)
    except KeyCollisionError:
        return
    except Exception:
        assume(False)
    if "state" in out and "param_groups" in out:
        names = [k for g in out["param_groups"] for k in g["params"]]
        before = [k for g in sd["param_groups"] for k in g["params"]]
        assert len(names) == len(set(names)) and len(names) <= len(before)
    else:
        kept = [k for k in sd if t(dict.fromkeys([k], 0))]
        assert len(out) == len(kept)


@given(state_dicts(min_size=1))
def test_strip_prefix_collision_with_unprefixed_key(sd):
    key = next(iter(sd))
    with pytest.raises(KeyCollisionError, match=re.escape(f"'p.{key}' and {key!r} both map to {key!r}")):
        strip_prefix("p.", strict=False)({f"p.{key}": 1, **sd})
