import gc

import attrs
import pytest
import torch

from sdtree import pipeline
from sdtree._gc import pauses_gc
from sdtree.errors import NotInvertibleError
from sdtree.transforms import Transform, add_prefix, fuse, identity, map_tensors, offload_to_cpu, rename, select_keys, strip_prefix


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


def test_transforms_pause_the_collector_while_they_run_and_resume_it():
    # the many small objects of a large state dict would trigger full
    # collections that walk every live tensor (sdtree._gc)
    seen = []

    def record(t):
        seen.append(gc.isenabled())
        if t.numel() == 2:
            raise ValueError("boom")
        return t

    sd = {"module.a": torch.ones(1)}
    for t, keys in ((map_tensors(record), ["module.a"]), (strip_prefix("module.") >> map_tensors(record), ["a"])):
        seen.clear()
        assert list(t(sd)) == keys
        assert seen and not any(seen) and gc.isenabled()
    with pytest.raises(ValueError, match="boom"):
        map_tensors(record)({"a": torch.ones(2)})
    assert gc.isenabled()  # resumed after an error too
    gc.disable()
    try:
        map_tensors(record)(sd)
        assert not gc.isenabled()  # the caller's pause is kept
    finally:
        gc.enable()


@attrs.frozen
class _Seen(Transform):
    """A transform of a user's own: it records whether the GC ran during its call."""

    seen: list = attrs.field(factory=list, eq=False)

    def __call__(self, state_dict):
        self.seen.append(gc.isenabled())
        return dict(state_dict)


def test_every_transform_class_pauses_the_collector_its_own_included():
    mine = _Seen()
    assert mine({"a": 1}) == {"a": 1} and mine.seen == [False] and gc.isenabled()
    assert pauses_gc(_Seen.__call__) and not pauses_gc(_Seen.__call__.__wrapped__)  # wrapped once, though attrs remade the class
    subclasses, todo = [], [Transform]
    while todo:
        todo.extend(sub := todo.pop().__subclasses__())
        subclasses.extend(sub)
    own_calls = {cls.__qualname__: cls.__dict__["__call__"] for cls in subclasses if "__call__" in cls.__dict__}
    assert len(own_calls) >= 15  # pipelines, key and tensor rules, optimizer forms, gathers, broadcasts, ...
    assert [name for name, call in own_calls.items() if not pauses_gc(call)] == []


def test_a_pipeline_of_many_keys_pays_no_full_collection():
    meta = torch.empty(2, 2, device="meta")
    sd = {f"module.layers.{i}.{n}": meta for i in range(20_000) for n in "ab"}
    full = []

    def count(phase, info):
        if phase == "start" and info["generation"] == 2:
            full.append(info)

    t = strip_prefix("module.") >> fuse(["layers.{i}.a", "layers.{i}.b"], "layers.{i}.ab")
    gc.collect()
    gc.callbacks.append(count)
    try:
        out = t(sd)
    finally:
        gc.callbacks.remove(count)
    assert len(out) == 20_000 and out["layers.7.ab"].shape == (4, 2) and full == []
