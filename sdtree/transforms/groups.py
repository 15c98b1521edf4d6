"""Groups: the keys a tensor rule reads together, found in a state dict.

A rule's patterns name the keys of one group by the values of the target's
placeholders (``layers.{i}.q`` and ``layers.{i}.k`` are one group per
``{i}``). :class:`Grouping` holds every group of a state dict as columns, for
planning many at once; :class:`Group` is one of them.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple, Optional

__all__ = ["Group", "Grouping", "in_turn", "in_order"]


class Group(NamedTuple):
    """The keys one application of a rule reads, in the order of its sources."""

    binding: tuple[tuple[str, str], ...]  # the target's placeholder values
    members: tuple[str, ...]


class Grouping(NamedTuple):
    """The groups a rule finds in a state dict, as columns: per group, the
    values of the placeholders ``names`` and the keys it reads; and the
    position in the state dict of each key read, group after group (None:
    not known). The planning of many groups works on the columns;
    :meth:`groups` makes the :class:`Group` of each."""

    names: tuple[str, ...]
    gids: list[tuple[str, ...]]
    members: list[tuple[str, ...]]
    positions: Optional[list[int]]

    def groups(self) -> list[Group]:
        new, names = tuple.__new__, self.names
        if len(names) == 1:
            (name,) = names
            return [new(Group, (((name, gid[0]),), m)) for gid, m in zip(self.gids, self.members)]
        return [new(Group, (tuple(zip(names, gid)), m)) for gid, m in zip(self.gids, self.members)]


def in_turn(indices: list[int], gids: list[tuple[str, ...]], n: int) -> bool:
    """Whether matched keys (the index of the source pattern each matches,
    and its group) come a whole group at a time, each group once, its keys
    in the order of the ``n`` sources (a model's layers, key by key): then
    the groups are consecutive slices of ``n``.

    >>> in_turn([0, 1, 0, 1], [("0",), ("0",), ("1",), ("1",)], 2)
    True
    >>> in_turn([1, 0, 0, 1], [("0",), ("0",), ("1",), ("1",)], 2)
    False
    """
    count, left = divmod(len(indices), n)
    if left or indices != list(range(n)) * count:
        return False
    firsts = gids[::n]
    return all(gids[i::n] == firsts for i in range(1, n)) and len(set(firsts)) == count


_GONE: Any = object()  # the key of the entries in_order drops


def in_order(
    keys: list[Any], values: list[Any], groups: list[Group], emitted: Mapping[str, list[tuple[str, Any]]],
    where: Optional[Mapping[str, int]],
) -> dict[str, Any]:
    """The entries of ``keys``/``values``, each group's one output (``emitted``
    under its first member) in the place of its first member, its other
    members dropped (at their positions ``where``): the dict is built in C."""
    keys, values = list(keys), list(values)
    if where is None:
        where = dict(zip(keys, range(len(keys))))
    for group in groups:
        members = group.members
        at = where[members[0]]
        keys[at], values[at] = emitted[members[0]][0]
        for member in members[1:]:
            keys[where[member]] = _GONE
    out = dict(zip(keys, values))
    out.pop(_GONE, None)
    return out
