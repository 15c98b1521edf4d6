"""Key patterns: a set's cheap test of a key's ends never loses a match."""

from sdtree.transforms.patterns import PatternSet, key_pattern

PATTERNS = ["{m}.q", "layers.{i}", "w", "a.{x}.b.{y}.c", "model.layers.{i}.self_attn.q_proj.weight", "{a}.{b}"]
KEYS = [
    "x.q", "q", ".q", "layers.3", "layers.", "layers.3.w", "w", "ww", "a.1.b.2.c", "a.1.b.2.d", "a.b.c",
    "model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.k_proj.weight", "x.y", "x.y.z", "",
]


def test_a_set_matches_each_key_as_its_patterns_do_and_its_candidates_keep_every_match():
    for texts in ([p] for p in PATTERNS[:-1]):
        patterns = tuple(key_pattern(t) for t in texts)
        found = PatternSet(patterns)
        expected = {k: next(((i, b) for i, p in enumerate(patterns) if (b := p.match(k)) is not None), None) for k in KEYS}
        assert {k: found.match(k) for k in KEYS} == expected
        candidates = found.candidates(KEYS)
        assert {k for k, m in expected.items() if m is not None} <= set(candidates)
    assert PatternSet((key_pattern("layers.{i}.attn.wq.weight"),)).candidates(["layers.0.attn.wq.weight", "layers.0.mlp.w1.weight", "norm.weight"]) == [
        "layers.0.attn.wq.weight"
    ]
    assert PatternSet((key_pattern("{a}.{b}"),)).match("x.y") == (0, {"a": "x", "b": "y"})
