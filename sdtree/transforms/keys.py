"""Key transforms: strip, add, rename, select and drop keys.

Each transform here is a function on keys (FQN strings) lifted to every form
of state dict (see :mod:`sdtree.types`): the keys of a model state dict, the
FQNs of an optimizer state dict (its ``state`` keys and every group's
``params``, consistently), and the FQN part of a flat optimizer state dict's
keys. So one pipeline renames a model and its optimizer alike.

Transforms return new containers and share every leaf; they never mutate
their input. A transform that would map two keys to one raises
:class:`~sdtree.errors.KeyCollisionError` naming both.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from itertools import compress, repeat
from operator import is_not
from typing import Any, Optional, Union

import attrs
import torch

from sdtree.errors import (
    InvalidRuleError,
    KeyCollisionError,
    LayoutMismatchError,
    MissingPrefixError,
    NonStringKeyError,
    preview,
)
from sdtree.fqn import split_flat_keys
from sdtree.transforms.compose import Transform
from sdtree.transforms.patterns import PatternSet, is_pattern, key_pattern, non_str
from sdtree.transforms.plans import Columns, as_dict
from sdtree.types import PARAMS, PG, STATE, form_of

__all__ = [
    "strip_prefix",
    "add_prefix",
    "rename",
    "select_keys",
    "drop_keys",
    "drop_meta_tensors",
]

NewKeys = list[Optional[str]]  # None drops the key


def _is_pair(transform: Transform, state_dict: Any) -> bool:
    """Whether ``state_dict`` is ``(model_state_dict, optim_state_dict)``, as
    the tensor transforms take it (the second is checked)."""
    if not (isinstance(state_dict, tuple) and len(state_dict) == 2):
        return False
    if form_of(state_dict[1], transform._factory) == "model":
        raise LayoutMismatchError(
            f"{transform!r}: the second of (model_state_dict, optim_state_dict) is not an optimizer state "
            "dict (neither {'state': ..., 'param_groups': [...]} nor its flat form)."
        )
    return True


class _KeyTransform(Transform):
    """A transform defined by a function on keys, applied to every form."""

    _takes_pending = True  # it never reads a value

    def _map_keys(self, keys: list[str]) -> NewKeys:
        """Map ``keys`` to new keys (``None`` to drop); raise on bad keys."""
        raise NotImplementedError

    def __call__(self, state_dict: Any, /) -> Any:
        if _is_pair(self, state_dict):
            return self(state_dict[0]), self(state_dict[1])
        form = form_of(state_dict, self._factory)
        if form == "optim":
            return self._apply_optim(state_dict)
        if form == "flat_optim":
            return self._apply_flat_optim(state_dict)
        keys = list(state_dict)
        self._check_str_keys(keys, "key")
        new_keys = self._map_keys(keys)
        if None in new_keys:
            out = {new: value for new, value in zip(new_keys, state_dict.values()) if new is not None}
        else:  # no key dropped: the dict built in C
            out = dict(zip(new_keys, state_dict.values()))  # type: ignore[arg-type]  # no None in new_keys
        self._check_collisions(keys, new_keys, len(out))
        return out

    def _call(self, state_dict: Any, pending: bool) -> Any:
        """Inside a pipeline (``pending``), a model state dict's new keys as
        :class:`~sdtree.transforms.plans.Columns`, no dict built; every
        other form as ``self(state_dict)``."""
        if pending and type(state_dict) is Columns:
            keys, values = state_dict.keys, state_dict.values
        elif pending and isinstance(state_dict, Mapping) and form_of(state_dict, self._factory) == "model":
            keys, values = list(state_dict), list(state_dict.values())
            self._check_str_keys(keys, "key")
        else:
            return self(as_dict(state_dict))
        new_keys = self._map_keys(keys)
        if None in new_keys:
            kept = list(map(is_not, new_keys, repeat(None)))
            new_keys, values = list(compress(new_keys, kept)), list(compress(values, kept))
        if len(set(new_keys)) < len(new_keys):  # two keys made one: the dict form names them
            return self(as_dict(state_dict))
        return Columns(new_keys, values)  # type: ignore[arg-type]  # no None left

    # -- the optimizer forms ------------------------------------------------

    def _rename_fqns(self, fqns: list[str]) -> dict[str, Optional[str]]:
        self._check_str_keys(fqns, "optimizer key")
        new = self._map_keys(fqns)
        self._check_collisions(fqns, new, len({n for n in new if n is not None}))
        return dict(zip(fqns, new))

    def _apply_optim(self, osd: Mapping[str, Any]) -> dict[str, Any]:
        state, groups = osd[STATE], osd[PG]
        fqns = dict.fromkeys(state)
        for group in groups:
            fqns.update(dict.fromkeys(group[PARAMS]))
        table = self._rename_fqns(list(fqns))
        new_state = {
            table[fqn]: value for fqn, value in state.items() if table[fqn] is not None
        }
        new_groups = []
        for group in groups:
            new_group = dict(group)
            new_group[PARAMS] = [
                table[fqn] for fqn in group[PARAMS] if table[fqn] is not None
            ]
            new_groups.append(new_group)
        return {STATE: new_state, PG: new_groups}

    def _apply_flat_optim(self, flat: Mapping[str, Any]) -> dict[str, Any]:
        parsed = split_flat_keys(flat, self._factory)
        fqns = list(dict.fromkeys(fqn for _, fqn, _ in parsed))
        table = self._rename_fqns(fqns)
        out = {}
        for (section, fqn, rest), value in zip(parsed, flat.values()):
            new = table[fqn]
            if new is not None:
                out[f"{section}{new}.{rest}"] = value
        return out

    # -- validation ---------------------------------------------------------

    def _check_str_keys(self, keys: Sequence[Any], what: str) -> None:
        bad = non_str(keys)
        if bad:
            hint = (
                " Optimizer state dicts from optim.state_dict() are keyed by "
                "parameter ids: apply param_ids_to_fqns(...) first."
                if what == "optimizer key"
                else " Key transforms work on FQN strings."
            )
            raise NonStringKeyError(
                f"{self._factory}: {len(bad)} {what}(s) are not strings: "
                f"{preview(bad)}.{hint}"
            )

    def _check_collisions(self, keys: list[str], new_keys: NewKeys, n_unique: int) -> None:
        if n_unique == len(new_keys) - new_keys.count(None):
            return
        seen: dict[str, str] = {}
        for old, new in zip(keys, new_keys):
            if new is None:
                continue
            if new in seen:
                raise KeyCollisionError(
                    f"{self!r}: keys {seen[new]!r} and {old!r} both map to {new!r}. "
                    "Change the rules or drop one of the keys first (drop_keys)."
                )
            seen[new] = old


# -- prefixes -----------------------------------------------------------------


@attrs.frozen(repr=False)
class _StripPrefix(_KeyTransform):
    _factory = "strip_prefix"
    prefix: str
    strict: bool = True

    def _map_keys(self, keys: list[str]) -> NewKeys:
        prefix, n = self.prefix, len(self.prefix)
        if self.strict:
            missing = [k for k in keys if not k.startswith(prefix)]
            if missing:
                raise MissingPrefixError(
                    f"strip_prefix: {len(missing)} of {len(keys)} keys do not start with "
                    f"prefix={prefix!r}: {preview(missing)}. "
                    "Pass strict=False to keep them unchanged."
                )
            return [k[n:] for k in keys]
        return [k[n:] if k.startswith(prefix) else k for k in keys]

    def inverse(self) -> Transform:
        if not self.strict:
            return super().inverse()
        return add_prefix(self.prefix)


@attrs.frozen(repr=False)
class _AddPrefix(_KeyTransform):
    _factory = "add_prefix"
    prefix: str

    def _map_keys(self, keys: list[str]) -> NewKeys:
        prefix = self.prefix
        return [prefix + k for k in keys]

    def inverse(self) -> Transform:
        return strip_prefix(self.prefix)


def strip_prefix(prefix: str, *, strict: bool = True) -> Transform:
    """Return a transform that strips ``prefix`` from every key.

    >>> strip_prefix("module.")({"module.w": 1, "module.b": 2})
    {'w': 1, 'b': 2}
    >>> strip_prefix("module.", strict=False)({"module.w": 1, "b": 2})
    {'w': 1, 'b': 2}

    See also: :func:`add_prefix`, its inverse (exact when ``strict``).

    Raises (when applied):
        MissingPrefixError: ``strict`` and a key lacks ``prefix``.
        KeyCollisionError: two keys strip to the same key.
    """
    _check_str("strip_prefix", "prefix", prefix)
    return _StripPrefix(prefix, strict=strict)


def add_prefix(prefix: str) -> Transform:
    """Return a transform that puts ``prefix`` before every key.

    >>> add_prefix("model.")({"w": 1})
    {'model.w': 1}

    See also: :func:`strip_prefix`, its inverse.
    """
    _check_str("add_prefix", "prefix", prefix)
    return _AddPrefix(prefix)


def _check_str(fn: str, name: str, value: Any) -> None:
    if not isinstance(value, str):
        raise TypeError(f"{fn}: {name} must be a str, got {name}={value!r}.")


# -- rename -------------------------------------------------------------------


@attrs.frozen(repr=False)
class _RenameByMapping(_KeyTransform):
    _factory = "rename"
    pairs: tuple[tuple[str, str], ...]
    _table: dict[str, str] = attrs.field(init=False, eq=False, repr=False)

    def __attrs_post_init__(self) -> None:
        object.__setattr__(self, "_table", dict(self.pairs))

    def _map_keys(self, keys: list[str]) -> NewKeys:
        get = self._table.get
        return [get(k, k) for k in keys]

    def inverse(self) -> Transform:
        reverse: dict[str, str] = {}
        for old, new in self.pairs:
            if new in reverse:
                raise KeyCollisionError(
                    f"{self!r}.inverse(): keys {reverse[new]!r} and {old!r} both map to "
                    f"{new!r}, so the rename has no inverse."
                )
            reverse[new] = old
        return _RenameByMapping(tuple(reverse.items()))

    def __repr__(self) -> str:
        return f"rename({dict(self.pairs)!r})"


@attrs.frozen(repr=False)
class _RenameByRegex(_KeyTransform):
    _factory = "rename"
    rules: tuple[tuple[str, str], ...]
    _compiled: tuple[tuple[re.Pattern[str], str], ...] = attrs.field(
        init=False, eq=False, repr=False
    )

    def __attrs_post_init__(self) -> None:
        object.__setattr__(self, "_compiled", tuple(_compile_rule(rule) for rule in self.rules))

    def _map_keys(self, keys: list[str]) -> NewKeys:
        new = keys
        for pattern, replacement in self._compiled:
            new = [pattern.sub(replacement, k) for k in new]
        return list(new)

    def __repr__(self) -> str:
        return f"rename({list(self.rules)!r})"


@attrs.frozen(repr=False)
class _RenameByPattern(_KeyTransform):
    _factory = "rename"
    pairs: tuple[tuple[str, str], ...]
    _compiled: tuple[PatternSet, tuple[str, ...]] = attrs.field(init=False, eq=False, repr=False)

    def __attrs_post_init__(self) -> None:
        sources = tuple(key_pattern(old, fn="rename") for old, _ in self.pairs)
        targets = tuple(key_pattern(new, fn="rename") for _, new in self.pairs)
        for source, target in zip(sources, targets):
            if source.placeholders != target.placeholders:
                raise InvalidRuleError(
                    f"rename: {source.text!r} -> {target.text!r}: both sides need the same placeholders, "
                    f"got {sorted(source.placeholders)} and {sorted(target.placeholders)}."
                )
        try:
            found = PatternSet(sources)
        except ValueError as err:
            raise InvalidRuleError(f"rename: {err}") from None
        # each target as a template filled with its source's placeholder values, in the source's order
        templates = tuple(t.template(source.names) for source, t in zip(sources, targets))
        object.__setattr__(self, "_compiled", (found, templates))

    def _map_keys(self, keys: list[str]) -> NewKeys:
        found, templates = self._compiled
        return list(found.substitute(keys, templates))

    def inverse(self) -> Transform:
        return _RenameByPattern(tuple((new, old) for old, new in self.pairs))

    def __repr__(self) -> str:
        return f"rename({dict(self.pairs)!r})"


def _compile_rule(rule: tuple[str, str]) -> tuple[re.Pattern[str], str]:
    """Compile a ``(pattern, replacement)`` rule, checking both now rather than
    at the first key: ``re`` parses a replacement's group references (``\\2``,
    ``\\g<name>``) against the pattern before it looks for a match, so a
    substitution into the empty string checks them without needing a match."""
    pattern, replacement = rule
    try:
        compiled = re.compile(pattern)
    except re.error as err:
        raise InvalidRuleError(
            f"rename: rule {rule!r}: the pattern is not a valid regular expression: {err}."
        ) from None
    try:
        compiled.sub(replacement, "")
    except (re.error, IndexError) as err:  # IndexError: an unknown group name
        if compiled.groups:
            named = "".join(f", \\g<{name}>" for name in compiled.groupindex)
            refs = f"has {compiled.groups} group(s): \\1 to \\{compiled.groups}{named}, and \\g<0> for the whole match"
        else:
            refs = "has no group: add one, as in (\\d+), or refer to the whole match as \\g<0>"
        raise InvalidRuleError(
            f"rename: rule {rule!r}: the replacement is invalid for this pattern: {err}. "
            f"The pattern {refs}; a literal backslash is written \\\\."
        ) from None
    return compiled, replacement


def rename(rules: Union[Mapping[str, str], Sequence[tuple[str, str]]]) -> Transform:
    """Return a transform that renames keys.

    ``rules`` is either a mapping ``{old: new}`` (keys not in it are kept) or a
    sequence of ``(pattern, replacement)`` regular-expression pairs, applied
    in order to every key with :func:`re.sub`. The keys of a mapping may be
    key patterns with ``{placeholders}`` (see :mod:`sdtree.transforms.patterns`),
    each mapped to a pattern with the same placeholders:
    ``rename({"model.layers.{i}.mlp.up_proj.weight": "layers.{i}.feed_forward.w3.weight"})``.

    >>> rename({"w": "weight"})({"w": 1, "b": 2})
    {'weight': 1, 'b': 2}
    >>> rename({"h.{i}.w": "layers.{i}.weight"})({"h.0.w": 1, "h.1.w": 2})
    {'layers.0.weight': 1, 'layers.1.weight': 2}
    >>> rename([(r"^layers\\.(\\d+)\\.", r"blocks.\\1.")])({"layers.0.w": 1})
    {'blocks.0.w': 1}

    A mapping rename (of keys or of patterns) has ``inverse()``; it is exact
    on state dicts where no key outside the mapping is also one of its
    targets. Regex renames have no inverse.

    Raises:
        InvalidRuleError: a pattern is not a regular expression, or its
            replacement refers to a group the pattern lacks (checked here,
            not when applied).

    Raises (when applied):
        KeyCollisionError: two keys would get the same name (both are named).
    """
    if isinstance(rules, Mapping):
        pairs = tuple(rules.items())
        for pair in pairs:
            _check_str("rename", "every old and new key", pair[0])
            _check_str("rename", "every old and new key", pair[1])
        if any(is_pattern(old) or is_pattern(new) for old, new in pairs):
            return _RenameByPattern(pairs)
        return _RenameByMapping(pairs)
    if isinstance(rules, (str, bytes)) or not isinstance(rules, Iterable):
        raise TypeError(
            f"rename: rules must be a mapping {{old: new}} or a list of "
            f"(pattern, replacement) pairs, got rules={rules!r}."
        )
    checked = []
    for rule in rules:
        if not (isinstance(rule, (tuple, list)) and len(rule) == 2):
            raise TypeError(
                f"rename: each regex rule must be a (pattern, replacement) pair, got {rule!r}."
            )
        _check_str("rename", "pattern", rule[0])
        _check_str("rename", "replacement", rule[1])
        checked.append((rule[0], rule[1]))
    return _RenameByRegex(tuple(checked))


# -- selection ----------------------------------------------------------------


@attrs.frozen(repr=False)
class _FilterKeys(_KeyTransform):
    prefixes: tuple[str, ...]
    where: Optional[Callable[[str], bool]]
    keep: bool

    @property
    def _factory(self) -> str:  # type: ignore[override]
        return "select_keys" if self.keep else "drop_keys"

    def _map_keys(self, keys: list[str]) -> NewKeys:
        prefixes, where, keep = self.prefixes, self.where, self.keep
        if where is None:
            return [k if k.startswith(prefixes) == keep else None for k in keys]
        return [k if bool(where(k)) == keep else None for k in keys]

    def __repr__(self) -> str:
        args = [repr(p) for p in self.prefixes]
        if self.where is not None:
            args.append(f"where={self.where!r}")
        return f"{self._factory}({', '.join(args)})"


def _filter(fn: str, prefixes: tuple[Any, ...], where: Any, keep: bool) -> Transform:
    if len(prefixes) == 1 and callable(prefixes[0]) and where is None:
        where, prefixes = prefixes[0], ()  # select_keys(predicate) reads as select_keys(where=predicate)
    if bool(prefixes) == (where is not None):
        raise TypeError(
            f"{fn}: pass key prefixes or where=predicate (exactly one of them), got "
            f"prefixes={prefixes!r}, where={where!r}."
        )
    for prefix in prefixes:
        _check_str(fn, "every prefix", prefix)
    if where is not None and not callable(where):
        raise TypeError(f"{fn}: where must be a callable key -> bool, got {where!r}.")
    return _FilterKeys(prefixes, where, keep)


def select_keys(
    *prefixes: Union[str, Callable[[str], bool]], where: Optional[Callable[[str], bool]] = None
) -> Transform:
    """Return a transform that keeps only the keys that start with one of
    ``prefixes``, or for which ``where(key)`` is true (a single callable
    passed positionally is taken as ``where``).

    >>> select_keys("encoder.")({"encoder.w": 1, "decoder.w": 2})
    {'encoder.w': 1}
    >>> select_keys(where=lambda k: k.endswith(".w"))({"a.w": 1, "a.b": 2})
    {'a.w': 1}
    >>> select_keys(lambda k: k.endswith(".b"))({"a.w": 1, "a.b": 2})
    {'a.b': 2}

    On an optimizer state dict, dropped FQNs leave ``state`` and every group's
    ``params``; groups themselves are kept (possibly empty).

    See also: :func:`drop_keys`.
    """
    return _filter("select_keys", prefixes, where, True)


def drop_keys(
    *prefixes: Union[str, Callable[[str], bool]], where: Optional[Callable[[str], bool]] = None
) -> Transform:
    """Return a transform that drops the keys that start with one of
    ``prefixes``, or for which ``where(key)`` is true (a single callable
    passed positionally is taken as ``where``).

    >>> drop_keys("decoder.")({"encoder.w": 1, "decoder.w": 2})
    {'encoder.w': 1}

    See also: :func:`select_keys`.
    """
    return _filter("drop_keys", prefixes, where, False)


@attrs.frozen(repr=False)
class _DropMetaTensors(Transform):
    _factory = "drop_meta_tensors"

    def __call__(self, state_dict: Any, /) -> Any:
        if _is_pair(self, state_dict):
            return self(state_dict[0]), self(state_dict[1])
        form = form_of(state_dict, self._factory)
        if form == "optim":
            return {
                STATE: {
                    key: {n: v for n, v in entry.items() if not _is_meta(v)}
                    if isinstance(entry, Mapping)
                    else entry
                    for key, entry in state_dict[STATE].items()
                },
                PG: list(state_dict[PG]),
            }
        return {k: v for k, v in state_dict.items() if not _is_meta(v)}


def _is_meta(value: Any) -> bool:
    return isinstance(value, torch.Tensor) and value.is_meta


def drop_meta_tensors() -> Transform:
    """Return a transform that drops every entry whose value is a meta tensor.

    In an optimizer state dict it drops meta tensors from each ``state``
    entry. Use it on state dicts of models built on the meta device, whose
    unmaterialised tensors hold no data.
    """
    return _DropMetaTensors()
