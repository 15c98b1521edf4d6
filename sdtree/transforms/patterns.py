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
from operator import attrgetter, methodcaller
from typing import Any, Optional

import attrs

from sdtree.errors import InvalidRuleError

__all__ = ["KeyPattern", "PatternSet", "key_pattern", "is_pattern", "nearest_keys", "non_str"]

_PLACEHOLDER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")
_HOLE = None  # a blanked-out segment in a skeleton
_LASTINDEX = attrgetter("lastindex")
_FIELD = re.compile(r"\{(\d+)\}")  # a positional field of a template
_END = ()  # in the trie of a PatternSet, the child that ends a pattern (no segment is a tuple)


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

    The patterns compile to one regular expression, matched in C: a trie of
    their segments, so patterns that share a start (``model.layers.{i}.``)
    test it once. Two patterns that could both name one key are refused
    when the set is built, so a key matches at most one.
    """

    patterns: tuple[KeyPattern, ...]
    # the compiled trie, and per end marker group: (pattern index, its placeholder groups)
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
        regex, outer = _compile_trie(self.patterns)
        object.__setattr__(self, "_regex", regex)
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

    def bindings(self, keys: Sequence[str], names: Sequence[str]) -> tuple[list[int], list[int], list[tuple[str, ...]]]:
        """For the keys of ``keys`` that a pattern matches, in order: their
        positions in ``keys``, the index of the pattern each matches, and the
        values of the placeholders ``names`` (which each pattern holds):
        :meth:`match_values` of many keys at once, their literal ends tested
        in C first, and where the patterns hold ``names`` in the same groups
        of the trie (a shared start), the values read in C too."""
        if self._regex is None:
            return [], [], []
        heads, tails = self._ends
        at = list(compress(range(len(keys)), map(str.endswith, keys, repeat(tails))))
        at = list(compress(at, map(str.startswith, map(keys.__getitem__, at), repeat(heads))))
        hits = list(map(self._regex.fullmatch, map(keys.__getitem__, at)))
        if None in hits:
            matched = [hit is not None for hit in hits]
            at, hits = list(compress(at, matched)), list(compress(hits, matched))
        # per end marker: the pattern, and the groups of ``names`` in it
        order = {
            end: (index, tuple(holes[self.patterns[index].names.index(n)] for n in names))
            for end, (index, holes) in self._outer.items()
        }
        ends = list(map(_LASTINDEX, hits))
        indices = [order[end][0] for end in ends]
        groups = {g for _, g in order.values()}
        if len(groups) > 1:
            values = [hit.group(*order[end][1]) for hit, end in zip(hits, ends)]
            return at, indices, [v if isinstance(v, tuple) else (v,) for v in values]
        (shared,) = groups
        if not shared:
            return at, indices, [()] * len(at)
        if len(shared) == 1:
            return at, indices, list(zip(map(methodcaller("group", shared[0]), hits)))
        return at, indices, list(map(methodcaller("group", *shared), hits))

    def substitute(self, keys: Iterable[str], templates: Sequence[str]) -> list[str]:
        """Each of ``keys`` that a pattern matches as ``templates[i]`` (of that
        pattern, a ``str.format`` template of positional fields numbered by
        the placeholders' order in it, as :meth:`KeyPattern.template` makes)
        filled with its values; the other keys as they are."""
        if self._regex is None:
            return list(keys)
        fullmatch = self._regex.fullmatch
        # per end marker: the template as (text before, the group filling its one field, text after)
        pieces = {end: _pieces(templates[index], holes, end) for end, (index, holes) in self._outer.items()}
        if all(len(p) == 3 for p in pieces.values()):  # joined by +: twice as fast as str.format
            return [
                key if (hit := fullmatch(key)) is None else (p := pieces[hit.lastindex])[0] + hit[p[1]] + p[2]
                for key in keys
            ]
        # per end marker: the template with each field renumbered to its regex group (less one: m.groups())
        table = {
            end: templates[index].format(*(f"{{{h - 1}}}" for h in holes))
            for end, (index, holes) in self._outer.items()
        }
        return [key if (hit := fullmatch(key)) is None else table[hit.lastindex].format(*hit.groups()) for key in keys]

    def match(self, key: str) -> Optional[tuple[int, dict[str, str]]]:
        """``(index of the pattern, placeholder values)`` of ``key``, or None."""
        found = self.match_values(key)
        if found is None:
            return None
        index, values = found
        return index, dict(zip(self.patterns[index].names, values))


def _compile_trie(patterns: Sequence[KeyPattern]) -> tuple[Any, dict[int, tuple[int, tuple[int, ...]]]]:
    """One regular expression matching the keys of ``patterns``, and per
    pattern the number of the empty group that ends its branch (the last
    group a match closes, so ``match.lastindex``) with the numbers of its
    placeholders' groups, in order.

    The regex is the trie of the patterns' segments: a start they share is
    tested once (an alternation of whole patterns tests it once per
    branch, about twice the cost for a dozen patterns with one prefix).
    """
    if not patterns:
        return None, {}
    trie: dict[Any, Any] = {}
    for index, pattern in enumerate(patterns):
        node = trie
        for segment in pattern.segments:
            node = node.setdefault(segment, {})
        node[_END] = index
    outer: dict[int, tuple[int, tuple[int, ...]]] = {}
    groups = [0]  # the last group number given

    def branches(node: dict[Any, Any], holes: tuple[int, ...], lead: str) -> str:
        alternatives = []
        for segment, child in node.items():  # groups are numbered as written, left to right
            if segment is _END:
                groups[0] += 1
                outer[groups[0]] = (child, holes)
                alternatives.append("()")
            elif segment is _HOLE:
                groups[0] += 1
                alternatives.append(lead + "([^.]+)" + branches(child, (*holes, groups[0]), r"\."))
            else:
                alternatives.append(lead + re.escape(segment) + branches(child, holes, r"\."))
        return alternatives[0] if len(alternatives) == 1 else "(?:" + "|".join(alternatives) + ")"

    return re.compile(branches(trie, (), "")), outer


def _pieces(template: str, holes: tuple[int, ...], end: int) -> tuple[Any, ...]:
    """A template of at most one field (``{k}``) as ``(before, group, after)``,
    the group of the regex that fills the field (with none: the empty end
    marker ``end``); a template of more fields as itself (a 1-tuple)."""
    fields = _FIELD.findall(template)
    if not fields:
        return template, end, ""
    if len(fields) == 1:
        before, after = template.split("{" + fields[0] + "}")
        return before, holes[int(fields[0])], after
    return (template,)


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
