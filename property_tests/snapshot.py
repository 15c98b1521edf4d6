"""Record everything about a state dict that a pure function must leave alone."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Iterator

import torch

from sdtree._tree import tree_flatten_with_accessor


def _containers(tree: Any, path: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    """Every dict, list and tuple of ``tree``: its path, type, identity and
    keys in order (or length), outermost first."""
    if isinstance(tree, Mapping):
        yield ("container", path, type(tree), id(tree), tuple(tree.keys()))
        for key, value in tree.items():
            yield from _containers(value, path + (key,))
    elif isinstance(tree, (list, tuple)):
        yield ("container", path, type(tree), id(tree), len(tree))
        for i, value in enumerate(tree):
            yield from _containers(value, path + (i,))


def snapshot(tree: Any) -> list[tuple[Any, ...]]:
    """Container paths, types, identities and key orders; leaf paths and
    identities; tensor versions, shapes, dtypes and values."""
    record: list[tuple[Any, ...]] = list(_containers(tree))
    accessors, leaves, _ = tree_flatten_with_accessor(tree)
    for accessor, leaf in zip(accessors, leaves):
        entry: tuple[Any, ...] = ("leaf", accessor.codify(), id(leaf), type(leaf))
        if isinstance(leaf, torch.Tensor) and not leaf.is_meta:
            entry += (leaf._version, leaf.shape, leaf.dtype, leaf.detach().clone())
        record.append(entry)
    return record


def assert_unchanged(before: list[tuple[Any, ...]], tree: Any) -> None:
    after = snapshot(tree)
    assert [e[:2] for e in before] == [e[:2] for e in after], "containers or leaves were added, removed or moved"
    for old, new in zip(before, after):
        if old[0] == "container":
            assert old == new, f"container at {old[1]} changed: {old[2:]} -> {new[2:]}"
            continue
        assert old[:4] == new[:4], f"changed: {old[1:4]} -> {new[1:4]}"
        if len(old) > 4:
            assert old[4] == new[4], f"{old[1]}: version counter {old[4]} -> {new[4]} (written in place)"
            assert old[5:7] == new[5:7]
            assert torch.equal(old[7], new[7]) or (old[7].is_floating_point() and torch.equal(old[7].isnan(), new[7].isnan()))
