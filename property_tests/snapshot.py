"""Record everything about a state dict that a pure function must leave alone."""

from __future__ import annotations

from typing import Any

import torch

from sdtree._tree import tree_flatten_with_accessor


def snapshot(tree: Any) -> list[tuple[Any, ...]]:
    """Paths, container types and identities, leaf identities, tensor versions and values."""
    accessors, leaves, spec = tree_flatten_with_accessor(tree)
    record: list[tuple[Any, ...]] = [("spec", str(spec), id(tree))]
    for accessor, leaf in zip(accessors, leaves):
        entry: tuple[Any, ...] = (accessor.codify(), id(leaf), type(leaf))
        if isinstance(leaf, torch.Tensor) and not leaf.is_meta:
            entry += (leaf._version, leaf.shape, leaf.dtype, leaf.detach().clone())
        record.append(entry)
    return record


def assert_unchanged(before: list[tuple[Any, ...]], tree: Any) -> None:
    after = snapshot(tree)
    assert len(before) == len(after), "the number of leaves changed"
    for old, new in zip(before, after):
        assert old[:3] == new[:3], f"changed: {old[:3]} -> {new[:3]}"
        if len(old) > 3:
            assert old[3] == new[3], f"{old[0]}: version counter {old[3]} -> {new[3]} (written in place)"
            assert old[4:6] == new[4:6]
            assert torch.equal(old[6], new[6]) or (old[6].is_floating_point() and torch.equal(old[6].isnan(), new[6].isnan()))
