"""Key patterns and pattern sets: a set matches each key as its patterns do."""

import pytest

from sdtree.errors import InvalidRuleError
from sdtree.transforms.patterns import PatternSet, key_pattern

PATTERNS = ["{m}.q", "layers.{i}", "w", "a.{x}.b.{y}.c", "model.layers.{i}.self_attn.q_proj.weight", "{a}.{b}"]
KEYS = [
    "x.q", "q", ".q", "layers.3", "layers.", "layers.3.w", "w", "ww", "a.1.b.2.c", "a.1.b.2.d", "a.b.c",
    "model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.k_proj.weight", "x.y", "x.y.z", "",
    "a.*.b.(.c", "w.", "layers.3\n",
]


def _one_by_one(patterns, key):
    return next(((i, b) for i, p in enumerate(patterns) if (b := p.match(key)) is not None), None)


@pytest.mark.parametrize(
    "texts",
    [[p] for p in PATTERNS] + [["{m}.q", "w", "a.{x}.b.{y}.c", "model.layers.{i}.self_attn.q_proj.weight"], ["layers.{i}", "w"]],
)
def test_a_set_matches_each_key_as_its_patterns_do(texts):
    patterns = tuple(key_pattern(t) for t in texts)
    found = PatternSet(patterns)
    for key in KEYS:
        assert found.match(key) == _one_by_one(patterns, key), key


def test_patterns_that_could_name_one_key_are_refused():
    with pytest.raises(InvalidRuleError, match=r"patterns '\{m\}.q' and 'layers.\{i\}' can name the same key \(e.g. 'layers.q'\)"):
        PatternSet((key_pattern("{m}.q"), key_pattern("layers.{i}")))
    with pytest.raises(InvalidRuleError, match="can name the same key"):
        PatternSet((key_pattern("a.{i}.w"), key_pattern("a.{j}.w")))
    PatternSet((key_pattern("a.{i}.w"), key_pattern("a.{i}.w.x"), key_pattern("b.{i}.w")))  # disjoint


def test_a_template_fills_placeholders_by_the_sources_order():
    assert key_pattern("l.{b}.x.{a}").template(["a", "b"]).format("1", "2") == "l.2.x.1"
    assert PatternSet((key_pattern("{a}.{b}"),)).match("x.y") == (0, {"a": "x", "b": "y"})
