"""Key patterns: FQNs with named placeholders, such as ``"layers.{i}.attn.q.weight"``.

A placeholder ``{name}`` stands for one whole, non-empty, dot-free segment of
a key. Patterns, not regular expressions, name the keys of the tensor
transforms and of pattern renames, so an inverse is derived structurally:
swap source and target patterns.

Matching is a hash lookup, not a regex scan: a key's segments, with the
placeholder positions of a pattern blanked out, are looked up in a table of
the patterns' literal segments. A set of patterns costs about the same per
key as one pattern.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Optional

import attrs

from sdtree.errors import InvalidRuleError

__all__ = ["KeyPattern", "PatternSet", "key_pattern", "nearest_keys"]

_PLACEHOLDER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")
_HOLE = None  # a blanked-out segment in a skeleton


@attrs.frozen(repr=False)
class KeyPattern:
    """A parsed key pattern. Build with :func:`key_pattern`.

    Attributes:
        text: the pattern as written.
        segments: its dot-separated segments; a placeholder's is ``None``.
        names: the placeholder names, by position.
    """

    text: str
    segments: tuple[Optional[str], ...]
    names: tuple[str, ...]
    positions: tuple[int, ...]

    @property
    def placeholders(self) -> frozenset[str]:
        return frozenset(self.names)

    def match(self, key: str) -> Optional[dict[str, str]]:
        """The placeholder values that make this pattern ``key``, or None."""
        parts = key.split(".")
        if len(parts) != len(self.segments):
            return None
        for part, segment in zip(parts, self.segments):
            if segment is None:
                if not part:
                    return None
            elif part != segment:
                return None
        return {name: parts[p] for name, p in zip(self.names, self.positions)}

    def format(self, binding: Mapping[str, str]) -> str:
        """The key this pattern names for ``binding`` (every placeholder given)."""
        parts = list(self.segments)
        for name, p in zip(self.names, self.positions):
            parts[p] = binding[name]
        return ".".join(parts)  # type: ignore[arg-type]  # every hole is filled

    def example(self) -> str:
        """The pattern with each placeholder as ``0``: a key to compare keys with."""
        return ".".join("0" if s is None else s for s in self.segments)

    def __repr__(self) -> str:
        return repr(self.text)


def key_pattern(text: str, *, fn: str = "key_pattern") -> KeyPattern:
    """Parse ``text`` into a :class:`KeyPattern`.

    >>> p = key_pattern("layers.{i}.attn.q.weight")
    >>> p.match("layers.3.attn.q.weight")
    {'i': '3'}
    >>> p.format({"i": "7"})
    'layers.7.attn.q.weight'

    Raises:
        TypeError: ``text`` is not a str.
        InvalidRuleError: a placeholder is not a whole segment, is not an
            identifier, or appears twice.
    """
    if isinstance(text, KeyPattern):
        return text
    if not isinstance(text, str):
        raise TypeError(f"{fn}: a key pattern must be a str, got {text!r}.")
    segments: list[Optional[str]] = []
    names: list[str] = []
    positions: list[int] = []
    for i, part in enumerate(text.split(".")):
        whole = _PLACEHOLDER.fullmatch(part)
        if whole:
            name = whole.group(1)
            if name in names:
                raise InvalidRuleError(f"{fn}: placeholder {{{name}}} appears twice in pattern {text!r}.")
            names.append(name)
            positions.append(i)
            segments.append(_HOLE)
        elif "{" in part or "}" in part:
            raise InvalidRuleError(
                f"{fn}: in pattern {text!r}, segment {part!r} is not a placeholder: a placeholder is a "
                "whole dot-free segment named like an identifier, e.g. 'layers.{i}.weight'."
            )
        elif not part:
            raise InvalidRuleError(f"{fn}: pattern {text!r} has an empty segment.")
        else:
            segments.append(part)
    return KeyPattern(text, tuple(segments), tuple(names), tuple(positions))


def is_pattern(text: str) -> bool:
    """Whether ``text`` holds a placeholder (so is a pattern, not a key)."""
    return _PLACEHOLDER.search(text) is not None


@attrs.frozen(repr=False)
class PatternSet:
    """Several patterns, matched at once: :meth:`match` tells which one a key
    is and its placeholder values."""

    patterns: tuple[KeyPattern, ...]
    # (number of segments, placeholder positions) -> {skeleton: pattern index}
    _tables: dict[tuple[int, tuple[int, ...]], dict[tuple[Optional[str], ...], int]] = attrs.field(
        init=False, eq=False
    )

    # the literal text before the first and after the last placeholder of each pattern:
    # a key that starts with no head or ends with no tail matches no pattern
    _ends: tuple[tuple[str, ...], tuple[str, ...]] = attrs.field(init=False, eq=False)

    def __attrs_post_init__(self) -> None:
        object.__setattr__(
            self, "_ends", (tuple({_head(p): None for p in self.patterns}), tuple({_tail(p): None for p in self.patterns}))
        )
        tables: dict[tuple[int, tuple[int, ...]], dict[tuple[Optional[str], ...], int]] = {}
        for index, pattern in enumerate(self.patterns):
            table = tables.setdefault((len(pattern.segments), pattern.positions), {})
            if pattern.segments in table:
                other = self.patterns[table[pattern.segments]]
                raise InvalidRuleError(
                    f"patterns {other.text!r} and {pattern.text!r} name the same keys; give each key one rule."
                )
            table[pattern.segments] = index
        object.__setattr__(self, "_tables", tables)

    def candidates(self, keys: Iterable[str]) -> list[str]:
        """The keys that may match a pattern (a cheap test of their ends);
        :meth:`match` tells which do."""
        heads, tails = self._ends
        return [k for k in keys if k.startswith(heads) and k.endswith(tails)]

    def match(self, key: str) -> Optional[tuple[int, dict[str, str]]]:
        """``(index of the pattern, placeholder values)`` of ``key``, or None."""
        heads, tails = self._ends
        if not (key.startswith(heads) and key.endswith(tails)):
            return None
        parts = key.split(".")
        n = len(parts)
        found: Optional[tuple[int, dict[str, str]]] = None
        for (length, positions), table in self._tables.items():
            if length != n:
                continue
            skeleton = list(parts)
            for p in positions:
                if not parts[p]:
                    break
                skeleton[p] = _HOLE  # type: ignore[call-overload]
            else:
                index = table.get(tuple(skeleton))
                if index is not None:
                    if found is not None:
                        raise InvalidRuleError(
                            f"key {key!r} matches both {self.patterns[found[0]].text!r} and "
                            f"{self.patterns[index].text!r}; give each key one rule."
                        )
                    pattern = self.patterns[index]
                    found = (index, {name: parts[p] for name, p in zip(pattern.names, pattern.positions)})
        return found


def _head(pattern: KeyPattern) -> str:
    """The literal start of every key ``pattern`` matches ("layers." of "layers.{i}.w")."""
    if not pattern.positions:
        return pattern.text
    return "".join(f"{s}." for s in pattern.segments[: pattern.positions[0]])


def _tail(pattern: KeyPattern) -> str:
    """The literal end of every key ``pattern`` matches (".w" of "layers.{i}.w")."""
    if not pattern.positions:
        return pattern.text
    return "".join(f".{s}" for s in pattern.segments[pattern.positions[-1] + 1 :])


def pattern_set(patterns: Iterable[KeyPattern]) -> PatternSet:
    return PatternSet(tuple(patterns))


def nearest_keys(patterns: Sequence[KeyPattern], keys: Sequence[str], n: int = 3) -> list[str]:
    """The keys most like ``patterns`` (for an error that says what was there instead)."""
    near: list[str] = []
    for pattern in patterns:
        for key in difflib.get_close_matches(pattern.example(), keys, n=n, cutoff=0.0):
            if key not in near:
                near.append(key)
    return near[:n]
