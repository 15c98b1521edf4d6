"""Strategies for the law tests: state dicts (from sdtree.testing) and transforms."""

from __future__ import annotations

import re

from hypothesis import strategies as st

from sdtree.testing import fqns, optimizer_state_dicts, state_dicts
from sdtree.transforms import add_prefix, drop_keys, rename, select_keys, strip_prefix

__all__ = ["fqns", "state_dicts", "optimizer_state_dicts", "fqn_optimizer_state_dicts", "key_transforms"]

_SEG = st.sampled_from(["module", "_orig_mod", "layers", "0", "enc", "a"])


def fqn_optimizer_state_dicts(**kwargs):
    return optimizer_state_dicts(keys="str", **kwargs)


def _has_even_length(key: str) -> bool:
    return len(key) % 2 == 0


key_transforms = st.one_of(
    _SEG.map(lambda s: add_prefix(s + ".")),
    _SEG.map(lambda s: strip_prefix(s + ".", strict=False)),
    st.tuples(_SEG, _SEG).map(lambda p: rename([("^" + re.escape(p[0]) + r"\.", p[1] + ".")])),
    st.dictionaries(fqns(max_segments=2), fqns(max_segments=2), max_size=3).map(rename),
    _SEG.map(lambda s: select_keys(s)),
    _SEG.map(lambda s: drop_keys(s)),
    st.just(select_keys(where=_has_even_length)),
)
