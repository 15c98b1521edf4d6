"""Flatten nested state dicts to one level of dotted keys, and back.

These are torch's ``_flatten_state_dict`` / ``_unflatten_state_dict`` (the
form ``torch.distributed.checkpoint`` saves): a value at ``sd["a"]["b"][0]``
gets the key ``"a.b.0"`` and the path ``("a", "b", 0)``; mapping keys become
strings, sequence indices stay ints, and sequences come back as lists.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Union

import optree

from sdtree._tree import tree_flatten_with_accessor
from sdtree.errors import KeyCollisionError, LayoutMismatchError, NotAMappingError, preview

__all__ = ["flatten_state_dict", "unflatten_state_dict"]

PathItem = Union[str, int]
ObjPath = tuple[PathItem, ...]


def flatten_state_dict(state_dict: dict[str, Any]) -> tuple[dict[str, Any], dict[str, ObjPath]]:
    """Flatten nested dicts, lists and tuples into one dict of dotted keys.

    >>> flatten_state_dict({"a": {"b": 1}, "c": [2, 3]})
    ({'a.b': 1, 'c.0': 2, 'c.1': 3}, {'a.b': ('a', 'b'), 'c.0': ('c', 0), 'c.1': ('c', 1)})

    Returns:
        The flat state dict, and the mapping from each flat key to its path,
        which :func:`unflatten_state_dict` takes.

    Raises:
        KeyCollisionError: two paths join to the same key (``{"a.b": 1,
            "a": {"b": 2}}``).
    """
    if not isinstance(state_dict, Mapping):
        raise NotAMappingError(f"flatten_state_dict: expected a Mapping, got {type(state_dict).__name__}.")
    accessors, leaves, _ = tree_flatten_with_accessor(state_dict)
    flat: dict[str, Any] = {}
    mapping: dict[str, ObjPath] = {}
    for accessor, leaf in zip(accessors, leaves):
        path = tuple(
            str(entry.entry) if isinstance(entry, optree.MappingEntry) else entry.entry
            for entry in accessor
        )
        key = ".".join(map(str, path))
        if key in flat:
            raise KeyCollisionError(
                f"flatten_state_dict: paths {mapping[key]!r} and {path!r} both flatten to "
                f"key {key!r}. Rename one of them before flattening."
            )
        flat[key] = leaf
        mapping[key] = path
    return flat, mapping


def unflatten_state_dict(state_dict: dict[str, Any], mapping: dict[str, ObjPath]) -> dict[str, Any]:
    """Rebuild the nested state dict from :func:`flatten_state_dict`'s output.

    >>> flat, mapping = flatten_state_dict({"a": {"b": 1}, "c": [2, 3]})
    >>> unflatten_state_dict(flat, mapping)
    {'a': {'b': 1}, 'c': [2, 3]}

    Raises:
        LayoutMismatchError: a key has no path in ``mapping``.
    """
    missing = [k for k in state_dict if k not in mapping]
    if missing:
        raise LayoutMismatchError(
            f"unflatten_state_dict: {len(missing)} key(s) have no path in the mapping: "
            f"{preview(missing)}. Pass the mapping that flatten_state_dict returned "
            "with this state dict."
        )
    nested: dict[str, Any] = {}
    for key, value in state_dict.items():
        _set_path(nested, mapping[key], value)
    return nested


def _set_path(root: dict[str, Any], path: ObjPath, value: Any) -> None:
    node: Any = root
    for here, after in zip(path, path[1:]):
        empty: Any = [] if type(after) is int else {}
        if isinstance(node, list):
            node.extend([None] * (here + 1 - len(node)))  # type: ignore[operator]
            if node[here] is None:  # type: ignore[index]
                node[here] = empty  # type: ignore[index]
            node = node[here]  # type: ignore[index]
        else:
            node = node.setdefault(here, empty)
    last = path[-1]
    if isinstance(node, list):
        node.extend([None] * (last + 1 - len(node)))  # type: ignore[operator]
    node[last] = value
