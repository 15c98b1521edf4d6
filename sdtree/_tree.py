"""optree, configured once for sdtree.

``None`` is a leaf (a state dict may hold ``None`` values), custom nodes are
registered only in the ``"sdtree"`` namespace, and paths and leaves come in
the dicts' insertion order, so results keep the order of the input.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import optree

NAMESPACE = "sdtree"

__all__ = [
    "NAMESPACE",
    "tree_flatten",
    "tree_flatten_with_path",
    "tree_flatten_keyed",
    "tree_flatten_with_accessor",
    "tree_map",
    "tree_unflatten",
    "codify",
]


def tree_flatten(tree: Any) -> tuple[list[Any], optree.PyTreeSpec]:
    with optree.dict_insertion_ordered(True, namespace=NAMESPACE):
        return optree.tree_flatten(tree, none_is_leaf=True, namespace=NAMESPACE)


def tree_flatten_with_path(tree: Any) -> tuple[list[tuple[Any, ...]], list[Any], optree.PyTreeSpec]:
    with optree.dict_insertion_ordered(True, namespace=NAMESPACE):
        return optree.tree_flatten_with_path(tree, none_is_leaf=True, namespace=NAMESPACE)


def tree_unflatten(spec: optree.PyTreeSpec, leaves: list[Any]) -> Any:
    return optree.tree_unflatten(spec, leaves)


def tree_map(fn: Callable[..., Any], tree: Any, *rests: Any) -> Any:
    """Map ``fn`` over the leaves of ``tree`` (and of ``rests``, matched by key)."""
    return optree.tree_map(fn, tree, *rests, none_is_leaf=True, namespace=NAMESPACE)


def codify(path: tuple[Any, ...], root: str = "state_dict") -> str:
    """Render a path as the Python expression that reaches it: ``sd['a'][0]``."""
    return root + "".join(f"[{part!r}]" for part in path)


def tree_flatten_keyed(tree: Any) -> tuple[list[tuple[Any, ...]], list[Any], optree.PyTreeSpec]:
    """Flatten with dict keys in sorted order, so two trees that hold the same
    keys in different orders flatten alike (for pairing leaves by key)."""
    return optree.tree_flatten_with_path(tree, none_is_leaf=True, namespace=NAMESPACE)


def tree_flatten_with_accessor(tree: Any) -> tuple[list[optree.PyTreeAccessor], list[Any], optree.PyTreeSpec]:
    with optree.dict_insertion_ordered(True, namespace=NAMESPACE):
        return optree.tree_flatten_with_accessor(tree, none_is_leaf=True, namespace=NAMESPACE)
