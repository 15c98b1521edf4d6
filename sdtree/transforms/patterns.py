"""Key patterns: FQNs with named placeholders, such as ``"layers.{i}.attn.q.weight"``.

A placeholder ``{name}`` stands for one whole, non-empty, dot-free segment of
a key. Patterns, not regular expressions, name the keys of the tensor
transforms and of pattern renames, so an inverse is derived structurally:
swap source and target patterns.

Users write patterns; sdtree compiles a set of them into one regular
expression (an alternation, matched in C), which costs well under a
microsecond a key for a dozen patterns.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable, Mapping, Sequence
from itertools import compress, repeat
from typing import Any, Optional

import attrs

from sdtree.errors import InvalidRuleError

__all__ = ["KeyPattern", "PatternSet", "key_pattern", "is_pattern", "nearest_keys", "non_str"]

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

    def template(self, names: Sequence[str]) -> str:
        """This pattern as a ``str.format`` template of positional fields, one per
        placeholder, numbered by its place in ``names`` (which holds them all):
        ``key_pattern("l.{i}.w").template(["i"]).format("3") == "l.3.w"``."""
        parts = [s if s is not None else "" for s in self.segments]
        for name, p in zip(self.names, self.positions):
            parts[p] = "{" + str(list(names).index(name)) + "}"
        return ".".join(parts)

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
    is and its placeholder values.

    The patterns compile to one regular expression (an alternation, matched
    in C); two patterns that could both name one key are refused when the
    set is built, so a key matches at most one.
    """

    patterns: tuple[KeyPattern, ...]
    # the compiled alternation, and per outer group: (pattern index, its placeholder groups)
    _regex: Any = attrs.field(init=False, eq=False)
    _outer: dict[int, tuple[int, tuple[int, ...]]] = attrs.field(init=False, eq=False)
    # the literal text before the first and after the last placeholder of each pattern
    _ends: tuple[tuple[str, ...], tuple[str, ...]] = attrs.field(init=False, eq=False)

    def __attrs_post_init__(self) -> None:
        for i, a in enumerate(self.patterns):
            for b in self.patterns[i + 1 :]:
                if _overlap(a, b):
                    raise InvalidRuleError(
                        f"patterns {a.text!r} and {b.text!r} can name the same key "
                        f"(e.g. {_common_key(a, b)!r}); give each key one rule."
                    )
        parts: list[str] = []
        outer: dict[int, tuple[int, tuple[int, ...]]] = {}
        group = 1
        for index, pattern in enumerate(self.patterns):
            start, group = group, group + 1
            body, holes = [], []
            for segment in pattern.segments:
                if segment is None:
                    body.append("([^.]+)")
                    holes.append(group)
                    group += 1
                else:
                    body.append(re.escape(segment))
            parts.append("(" + r"\.".join(body) + ")")
            outer[start] = (index, tuple(holes))
        object.__setattr__(self, "_regex", re.compile("|".join(parts)) if parts else None)
        object.__setattr__(self, "_outer", outer)
        heads = tuple(dict.fromkeys(_head(p) for p in self.patterns))
        tails = tuple(dict.fromkeys(_tail(p) for p in self.patterns))
        object.__setattr__(self, "_ends", (heads, tails))

    def candidates(self, keys: Iterable[str]) -> list[str]:
        """The keys whose literal start and end fit some pattern (a test of
        string ends, several times cheaper than a match): a superset of the
        keys :meth:`match` matches."""
        heads, tails = self._ends
        return [k for k in keys if k.endswith(tails) and k.startswith(heads)]

    def match_values(self, key: str) -> Optional[tuple[int, tuple[str, ...]]]:
        """``(index of the pattern, its placeholder values in the order of its
        names)`` of ``key``, or None: the fast form of :meth:`match`."""
        found = self._regex.fullmatch(key) if self._regex is not None else None
        if found is None:
            return None
        index, holes = self._outer[found.lastindex]
        if len(holes) == 1:
            return index, (found.group(holes[0]),)
        return index, found.group(*holes) if holes else ()

    def bindings(self, keys: Sequence[str], names: Sequence[str]) -> list[tuple[int, int, tuple[str, ...]]]:
        """``(position in keys, index of the pattern, values of the placeholders
        names)`` for each of ``keys`` that a pattern matches (each pattern
        holds every one of ``names``), in order: :meth:`match_values` of many
        keys at once, their literal ends tested in C first."""
        if self._regex is None:
            return []
        heads, tails = self._ends
        at = list(compress(range(len(keys)), map(str.endswith, keys, repeat(tails))))
        at = list(compress(at, map(str.startswith, [keys[i] for i in at], repeat(heads))))
        # per outer group: the pattern, and its groups of ``names`` (after group 0, so group() gives a tuple)
        order = {
            start: (index, (0, *(holes[self.patterns[index].names.index(n)] for n in names)))
            for start, (index, holes) in self._outer.items()
        }
        fullmatch = self._regex.fullmatch
        found = []
        for i in at:
            hit = fullmatch(keys[i])
            if hit is not None:
                index, groups = order[hit.lastindex]
                found.append((i, index, hit.group(*groups)[1:] if len(groups) > 1 else ()))
        return found

    def substitute(self, keys: Iterable[str], templates: Sequence[str]) -> list[str]:
        """Each of ``keys`` that a pattern matches as ``templates[i]`` (of that
        pattern, a ``str.format`` template of positional fields numbered by
        the placeholders' order in it, as :meth:`KeyPattern.template` makes)
        filled with its values; the other keys as they are."""
        if self._regex is None:
            return list(keys)
        fullmatch = self._regex.fullmatch
        # per outer group: the template with each field renumbered to its regex group (less one: m.groups())
        table = {
            start: templates[index].format(*(f"{{{h - 1}}}" for h in holes))
            for start, (index, holes) in self._outer.items()
        }
        return [key if (hit := fullmatch(key)) is None else table[hit.lastindex].format(*hit.groups()) for key in keys]

    def match(self, key: str) -> Optional[tuple[int, dict[str, str]]]:
        """``(index of the pattern, placeholder values)`` of ``key``, or None."""
        found = self.match_values(key)
        if found is None:
            return None
        index, values = found
        return index, dict(zip(self.patterns[index].names, values))


def non_str(keys: Sequence[Any]) -> list[Any]:
    """The keys that are not exactly ``str`` (the types tested in C first:
    usually there is none)."""
    if set(map(type, keys)) <= {str}:
        return []
    return [k for k in keys if type(k) is not str]


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


def _overlap(a: KeyPattern, b: KeyPattern) -> bool:
    """Whether some key matches both ``a`` and ``b``."""
    return len(a.segments) == len(b.segments) and all(
        x is None or y is None or x == y for x, y in zip(a.segments, b.segments)
    )


def _common_key(a: KeyPattern, b: KeyPattern) -> str:
    return ".".join(x if x is not None else (y if y is not None else "0") for x, y in zip(a.segments, b.segments))


def nearest_keys(patterns: Sequence[KeyPattern], keys: Sequence[str], n: int = 3) -> list[str]:
    """The keys most like ``patterns`` (for an error that says what was there instead)."""
    near: list[str] = []
    for pattern in patterns:
        for key in difflib.get_close_matches(pattern.example(), keys, n=n, cutoff=0.0):
            if key not in near:
                near.append(key)
    return near[:n]
