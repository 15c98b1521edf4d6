import pytest

from sdtree import pipeline
from sdtree.errors import NotInvertibleError
from sdtree.transforms import add_prefix, identity, offload_to_cpu, rename, select_keys, strip_prefix


def test_rshift_composes_left_to_right():
    t = strip_prefix("module.") >> add_prefix("m.")
    assert t({"module.w": 1}) == {"m.w": 1}


def test_pipeline_flattens_and_reprs_as_calls():
    t = pipeline(strip_prefix("module."), pipeline(rename({"a": "b"}), offload_to_cpu(pin_memory=True)))
    assert repr(t) == "strip_prefix('module.') >> rename({'a': 'b'}) >> offload_to_cpu(pin_memory=True)"
    assert len(t.transforms) == 3


def test_pipeline_inverse_reverses_steps():
    t = strip_prefix("module.") >> rename({"a": "b"}) >> add_prefix("x.")
    assert repr(t.inverse()) == "strip_prefix('x.') >> rename({'b': 'a'}) >> add_prefix('module.')"
    sd = {"module.a": 1, "module.c": 2}
    assert t.inverse()(t(sd)) == sd


def test_pipeline_inverse_fails_on_lossy_step():
    with pytest.raises(NotInvertibleError, match=r"select_keys\('a'\)\.inverse\(\)"):
        (add_prefix("x") >> select_keys("a")).inverse()


def test_identity_and_single_step_pipeline():
    assert identity()({"a": 1}) == {"a": 1}
    assert repr(identity()) == "pipeline()"
    assert pipeline(add_prefix("a")) == add_prefix("a")


def test_pipeline_rejects_non_transforms():
    with pytest.raises(TypeError, match="expected Transform objects, got function"):
        pipeline(lambda sd: sd)
    with pytest.raises(TypeError):
        add_prefix("a") >> (lambda sd: sd)


def test_transforms_are_frozen_and_hashable():
    t = strip_prefix("a")
    with pytest.raises(AttributeError):
        t.prefix = "b"
    assert hash(t) == hash(strip_prefix("a")) and t == strip_prefix("a")
