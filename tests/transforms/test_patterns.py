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


# sets whose patterns share starts, end where another goes on, and hold a
# literal where another holds a placeholder: the shapes of the trie a set
# compiles to
TRIES = [
    ["a.{i}.x", "a.{i}.y.{j}", "a.{i}", "b", "a.0.z"],
    ["model.layers.{i}.self_attn.q_proj.weight", "model.layers.{i}.self_attn.k_proj.weight", "model.layers.{i}.mlp.up_proj.weight",
     "model.norm.weight", "model.embed_tokens.weight", "lm_head.weight"],
    ["l.{i}.e.{e}.w", "l.{i}.e.{e}.b", "l.{i}.n", "l.x.{i}.m"],
    ["{a}.w", "x.{b}.v"],
]
TRIE_KEYS = [
    "a.1.x", "a.1.y.2", "a.3", "b", "a.0.z", "a.0.x", "a.0", "a.b.c.d", "c", "a.1.y", "a..x",
    "model.layers.7.self_attn.q_proj.weight", "model.layers.7.self_attn.v_proj.weight", "model.layers.7.mlp.up_proj.weight",
    "model.norm.weight", "lm_head.weight", "model.layers.7", "l.0.e.3.w", "l.0.e.3.b", "l.0.n", "l.x.5.m", "l.x.e.1.w",
    "l.x.n", "q.w", "x.y.v", "x.w",
]


@pytest.mark.parametrize("texts", TRIES)
def test_a_trie_matches_binds_and_substitutes_each_key_as_its_patterns_do(texts):
    patterns = tuple(key_pattern(t) for t in texts)
    found = PatternSet(patterns)
    expected = {key: _one_by_one(patterns, key) for key in TRIE_KEYS}
    assert {key: found.match(key) for key in TRIE_KEYS} == expected
    assert any(expected.values()), "the keys exercise the set"
    # bindings: each matched key's position, pattern and values, in order
    names = sorted(set.intersection(*(set(p.names) for p in patterns)))
    at, indices, values = found.bindings(TRIE_KEYS, names)
    hits = [(i, m[0], tuple(m[1][n] for n in names)) for i, key in enumerate(TRIE_KEYS) if (m := expected[key])]
    assert list(zip(at, indices, values)) == hits
    # substitute: every matched key through its pattern's template, the rest as they are
    templates = [f"T{j}." + ".".join(f"{{{k}}}" for k in range(len(p.names))) for j, p in enumerate(patterns)]
    renamed = [
        key if (m := expected[key]) is None else templates[m[0]].format(*(m[1][n] for n in patterns[m[0]].names))
        for key in TRIE_KEYS
    ]
    assert found.substitute(TRIE_KEYS, templates) == renamed
