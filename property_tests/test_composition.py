"""Law: ``(a >> b)(x) == b(a(x))``, and key transforms act alike on every form."""

from hypothesis import given
from hypothesis import strategies as st

from sdtree import pipeline
from sdtree.errors import SdtreeError
from sdtree.testing import assert_state_dict_equal
from sdtree.transforms import flatten_optimizer, offload_to_cpu

from .strategies import fqn_optimizer_state_dicts, key_transforms, state_dicts


def _outcome(fn, x):
    try:
        return "ok", fn(x)
    except SdtreeError as err:
        return "error", type(err)


def _same_outcome(left, right):
    assert left[0] == right[0], (left, right)
    if left[0] == "ok":
        assert_state_dict_equal(left[1], right[1])
    else:
        assert left[1] is right[1]


@given(state_dicts(), key_transforms, key_transforms)
def test_rshift_equals_sequential_application(sd, a, b):
    _same_outcome(_outcome(a >> b, sd), _outcome(lambda x: b(a(x)), sd))


@given(state_dicts(), key_transforms, key_transforms, key_transforms)
def test_composition_is_associative(sd, a, b, c):
    _same_outcome(_outcome((a >> b) >> c, sd), _outcome(a >> (b >> c), sd))
    assert repr((a >> b) >> c) == repr(a >> (b >> c)) == repr(pipeline(a, b, c))


@given(fqn_optimizer_state_dicts(), st.lists(key_transforms, max_size=3))
def test_key_transforms_commute_with_flatten_optimizer(osd, steps):
    t = pipeline(*steps)
    _same_outcome(_outcome(t >> flatten_optimizer(), osd), _outcome(flatten_optimizer() >> t, osd))


@given(state_dicts(), key_transforms)
def test_offload_commutes_with_key_transforms(sd, t):
    _same_outcome(_outcome(t >> offload_to_cpu(), sd), _outcome(offload_to_cpu() >> t, sd))
