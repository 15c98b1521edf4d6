"""Optimizer state dict transforms.

Map parameter ids to FQNs and back, flatten to torch's flat form and back,
merge the state dicts of several optimizers and split them again. Like every
transform they return new containers, share leaves and subtrees they do not
change, and never mutate their input.

What the flat form cannot carry (which FQNs form each param group, the
hyper-parameters of a group with no parameters, state entries that are empty)
is kept in an :class:`OptimizerLayout`, plain immutable data that
:func:`optimizer_layout` reads off an unflattened state dict (and that the
adapters read off a live optimizer).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Union

import attrs
import torch

from sdtree.errors import (
    KeyCollisionError,
    LayoutMismatchError,
    MissingParamIdError,
    NotAMappingError,
    UnsupportedLeafError,
    preview,
)
from sdtree.fqn import parse_flat_key
from sdtree.transforms.compose import Transform
from sdtree.types import PARAMS, PG, STATE, STATE_DOT, Key, is_optim_state_dict

__all__ = [
    "OptimizerLayout",
    "optimizer_layout",
    "param_ids_to_fqns",
    "fqns_to_param_ids",
    "flatten_optimizer",
    "unflatten_optimizer",
    "merge_optimizers",
    "split_optimizer",
]


def _check_optim(obj: Any, fn: str) -> None:
    if not is_optim_state_dict(obj):
        found = (
            f"keys {preview(list(obj))}" if isinstance(obj, Mapping) else type(obj).__name__
        )
        raise NotAMappingError(
            f"{fn}: expected an optimizer state dict {{'state': {{...}}, "
            f"'param_groups': [...]}}, found {found}. Pass optim.state_dict() "
            "(unflattened) here."
        )


def _group_keys(groups: Any) -> tuple[tuple[Key, ...], ...]:
    return tuple(tuple(group) for group in groups)


def _to_dict(mapping: Any) -> dict[int, Mapping[str, Any]]:
    return dict(mapping)


@attrs.frozen
class OptimizerLayout:
    """Which keys form each param group, and what the flat form drops.

    Attributes:
        param_groups: the keys (ids or FQNs) of each param group, in order.
        empty_group_hyperparams: for each group with no parameters, by index,
            its hyper-parameters (the flat form holds none for it).
        empty_states: keys whose ``state`` entry is an empty dict.
    """

    param_groups: tuple[tuple[Key, ...], ...] = attrs.field(converter=_group_keys)
    empty_group_hyperparams: Mapping[int, Mapping[str, Any]] = attrs.field(factory=dict, converter=_to_dict)
    empty_states: tuple[Key, ...] = attrs.field(default=(), converter=tuple)


LayoutLike = Union[OptimizerLayout, Sequence[Sequence[Key]]]


def _as_layout(layout: LayoutLike, fn: str) -> OptimizerLayout:
    if isinstance(layout, OptimizerLayout):
        return layout
    if isinstance(layout, (str, bytes, Mapping)) or not isinstance(layout, Sequence):
        raise TypeError(
            f"{fn}: layout must be an OptimizerLayout or a list of the keys of each "
            f"param group, got {layout!r}. Use optimizer_layout(osd)."
        )
    return OptimizerLayout(layout)


def optimizer_layout(osd: Mapping[str, Any]) -> OptimizerLayout:
    """Return the layout of an (unflattened) optimizer state dict.

    >>> optimizer_layout({"state": {}, "param_groups": [{"lr": 1, "params": ["a", "b"]}]})
    OptimizerLayout(param_groups=(('a', 'b'),), empty_group_hyperparams={}, empty_states=())
    """
    _check_optim(osd, "optimizer_layout")
    groups = osd[PG]
    return OptimizerLayout(
        [group[PARAMS] for group in groups],
        empty_group_hyperparams={
            i: {k: v for k, v in group.items() if k != PARAMS}
            for i, group in enumerate(groups)
            if not group[PARAMS]
        },
        empty_states=[k for k, v in osd[STATE].items() if isinstance(v, Mapping) and not v],
    )


# -- ids <-> FQNs -------------------------------------------------------------


@attrs.frozen(repr=False)
class _RekeyOptimizer(Transform):
    table: Mapping[Key, Key] = attrs.field(eq=False)
    factory: str
    inverse_factory: str

    def __call__(self, osd: Mapping[str, Any], /) -> dict[str, Any]:
        _check_optim(osd, self.factory)
        table = self.table
        state, groups = osd[STATE], osd[PG]
        used = dict.fromkeys(state)
        for group in groups:
            used.update(dict.fromkeys(group[PARAMS]))
        missing = [k for k in used if k not in table]
        if missing:
            raise MissingParamIdError(
                f"{self.factory}: {len(missing)} optimizer key(s) are not in the mapping "
                f"of {len(table)} entries: {preview(missing)}. Build the mapping from "
                "the same model and optimizer that produced the state dict."
            )
        if len({table[k] for k in used}) != len(used):
            targets: dict[Key, Key] = {}
            for old in used:
                new = table[old]
                if new in targets:
                    raise KeyCollisionError(
                        f"{self.factory}: keys {targets[new]!r} and {old!r} both map to "
                        f"{new!r}. Each parameter needs its own key."
                    )
                targets[new] = old
        new_state = {table[k]: v for k, v in state.items()}
        new_groups = [{**group, PARAMS: [table[k] for k in group[PARAMS]]} for group in groups]
        return {STATE: new_state, PG: new_groups}

    def inverse(self) -> Transform:
        reverse: dict[Key, Key] = {}
        for old, new in self.table.items():
            if new in reverse:
                raise KeyCollisionError(
                    f"{self.factory}.inverse(): {reverse[new]!r} and {old!r} both map to "
                    f"{new!r}, so the mapping has no inverse."
                )
            reverse[new] = old
        return _RekeyOptimizer(reverse, self.inverse_factory, self.factory)

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, _RekeyOptimizer)
            and self.factory == other.factory
            and dict(self.table) == dict(other.table)
        )

    def __hash__(self) -> int:
        return hash((self.factory, len(self.table)))

    def __repr__(self) -> str:
        if len(self.table) <= 4:
            return f"{self.factory}({dict(self.table)!r})"
        head = ", ".join(f"{k!r}: {v!r}" for k, v in list(self.table.items())[:2])
        return f"{self.factory}({{{head}, ...}} ({len(self.table)} entries))"


def param_ids_to_fqns(mapping: Mapping[int, str]) -> Transform:
    """Return a transform that re-keys an optimizer state dict from parameter
    ids to FQNs, in ``state`` and in every group's ``params``.

    >>> osd = {"state": {0: {"step": 1}}, "param_groups": [{"lr": 0.1, "params": [0, 1]}]}
    >>> param_ids_to_fqns({0: "w", 1: "b"})(osd)
    {'state': {'w': {'step': 1}}, 'param_groups': [{'lr': 0.1, 'params': ['w', 'b']}]}

    See also: :func:`fqns_to_param_ids`, its inverse.

    Raises (when applied):
        MissingParamIdError: a key of the state dict is not in ``mapping``.
        KeyCollisionError: two keys map to one FQN.
    """
    table: dict[Key, Key] = {k: v for k, v in mapping.items()}
    return _RekeyOptimizer(table, "param_ids_to_fqns", "fqns_to_param_ids")


def fqns_to_param_ids(mapping: Mapping[str, int]) -> Transform:
    """Return a transform that re-keys an optimizer state dict from FQNs to
    parameter ids (what ``Optimizer.load_state_dict`` takes).

    >>> osd = {"state": {"w": {"step": 1}}, "param_groups": [{"lr": 0.1, "params": ["w"]}]}
    >>> fqns_to_param_ids({"w": 0})(osd)
    {'state': {0: {'step': 1}}, 'param_groups': [{'lr': 0.1, 'params': [0]}]}

    See also: :func:`param_ids_to_fqns`, its inverse.
    """
    table: dict[Key, Key] = {k: v for k, v in mapping.items()}
    return _RekeyOptimizer(table, "fqns_to_param_ids", "param_ids_to_fqns")


# -- flat form ----------------------------------------------------------------


def _flatten_entry(entry: Mapping[Any, Any], prefix: str, out: dict[str, Any]) -> None:
    for name, value in entry.items():
        key = f"{prefix}.{name}"
        if isinstance(value, Mapping):
            if not value:
                raise UnsupportedLeafError(
                    f"flatten_optimizer: state value {key!r} is an empty dict, which the "
                    "flat form cannot represent. Drop it before flattening."
                )
            _flatten_entry(value, key, out)
        elif isinstance(value, (torch.Tensor, int, float)):
            out[key] = value
        else:
            raise UnsupportedLeafError(
                f"flatten_optimizer: state value {key!r} has type {type(value).__name__}; "
                "the flat form holds tensors, ints, floats and dicts of them. "
                "Keep the optimizer state dict unflattened, or drop that value."
            )


@attrs.frozen(repr=False)
class _FlattenOptimizer(Transform):
    _factory = "flatten_optimizer"

    def __call__(self, osd: Mapping[str, Any], /) -> dict[str, Any]:
        _check_optim(osd, "flatten_optimizer")
        out: dict[str, Any] = {}
        for key, entry in osd[STATE].items():
            if not isinstance(entry, Mapping):
                raise UnsupportedLeafError(
                    f"flatten_optimizer: state[{key!r}] is a {type(entry).__name__}, "
                    "expected a dict of state values."
                )
            _flatten_entry(entry, f"state.{key}", out)
        seen: dict[str, int] = {}
        for index, group in enumerate(osd[PG]):
            hypers = [(k, v) for k, v in group.items() if k != PARAMS]
            for key in group[PARAMS]:
                if str(key) in seen:
                    raise KeyCollisionError(
                        f"flatten_optimizer: key {key!r} is in param group {seen[str(key)]} "
                        f"and in param group {index}. A parameter belongs to one group."
                    )
                seen[str(key)] = index
                for name, value in hypers:
                    out[f"param_groups.{key}.{name}"] = value
        return out


def flatten_optimizer() -> Transform:
    """Return a transform to torch's flat optimizer form.

    ``state[fqn][name]`` becomes ``"state.<fqn>.<name>"`` (nested dicts
    flatten further), and each hyper-parameter of each group is repeated for
    every parameter as ``"param_groups.<fqn>.<hyper>"``.

    >>> osd = {"state": {"w": {"step": 1}}, "param_groups": [{"lr": 0.1, "params": ["w"]}]}
    >>> flatten_optimizer()(osd)
    {'state.w.step': 1, 'param_groups.w.lr': 0.1}

    Its inverse needs the layout: ``unflatten_optimizer(optimizer_layout(osd))``.
    """
    return _FlattenOptimizer()


def _str_table(layout: OptimizerLayout, fn: str) -> dict[str, Key]:
    table: dict[str, Key] = {}
    for group in layout.param_groups:
        for key in group:
            if str(key) in table:
                raise LayoutMismatchError(
                    f"{fn}: the layout lists {table[str(key)]!r} and {key!r}, which "
                    "flatten to the same name. Each parameter appears once."
                )
            table[str(key)] = key
    return table


@attrs.frozen(repr=False)
class _UnflattenOptimizer(Transform):
    _factory = "unflatten_optimizer"
    layout: OptimizerLayout

    def __call__(self, flat: Mapping[str, Any], /) -> dict[str, Any]:
        fn = "unflatten_optimizer"
        if not isinstance(flat, Mapping):
            raise NotAMappingError(f"{fn}: expected a flat optimizer state dict, got {type(flat).__name__}.")
        layout = self.layout
        table = _str_table(layout, fn)
        state: dict[Key, dict[str, Any]] = {}
        hypers: dict[str, dict[str, Any]] = {}
        strays = []
        for key, value in flat.items():
            if not isinstance(key, str):
                strays.append(key)
                continue
            parsed = parse_flat_key(key, table)
            if parsed is None:
                strays.append(key)
                continue
            section, fqn, name = parsed
            if section == STATE_DOT:
                entry = state.setdefault(table[fqn], {})
                *parents, leaf = name.split(".")
                for part in parents:
                    entry = entry.setdefault(part, {})
                entry[leaf] = value
            else:
                hypers.setdefault(fqn, {})[name] = value
        if strays:
            raise LayoutMismatchError(
                f"{fn}: {len(strays)} key(s) match no parameter of the layout: "
                f"{preview(strays)}. Expected 'state.<fqn>.<name>' or "
                "'param_groups.<fqn>.<hyper>' for the FQNs in the layout."
            )
        for empty in layout.empty_states:
            state.setdefault(empty, {})
        groups = []
        for index, keys in enumerate(layout.param_groups):
            if not keys:
                if index not in layout.empty_group_hyperparams:
                    raise LayoutMismatchError(
                        f"{fn}: param group {index} has no parameters, so the flat form "
                        "holds none of its hyper-parameters. Pass optimizer_layout(osd) "
                        "of the original state dict, which records them."
                    )
                groups.append({**layout.empty_group_hyperparams[index], PARAMS: []})
                continue
            names = [str(k) for k in keys]
            absent = [n for n in names if n not in hypers]
            if absent:
                raise LayoutMismatchError(
                    f"{fn}: param group {index} lists {len(absent)} key(s) with no "
                    f"'param_groups.<fqn>.<hyper>' entries: {preview(absent)}. The flat "
                    "state dict and the layout come from different optimizers."
                )
            first = hypers[names[0]]
            for name in names[1:]:
                other = hypers[name]
                if other.keys() != first.keys() or not all(
                    _same(other[k], first[k]) for k in first
                ):
                    diff = sorted(
                        (first.keys() ^ other.keys())
                        | {k for k in first.keys() & other.keys() if not _same(first[k], other[k])}
                    )
                    raise LayoutMismatchError(
                        f"{fn}: params {names[0]!r} and {name!r} of param group {index} "
                        f"have different hyper-parameters {diff!r}; all parameters of "
                        "a group share them."
                    )
            groups.append({**first, PARAMS: list(keys)})
        return {STATE: state, PG: groups}


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (
            isinstance(a, torch.Tensor)
            and isinstance(b, torch.Tensor)
            and a.shape == b.shape
            and bool(torch.equal(a, b))
        )
    return bool(a == b)


def unflatten_optimizer(layout: LayoutLike) -> Transform:
    """Return a transform from torch's flat optimizer form back to
    ``{"state": ..., "param_groups": ...}``.

    ``layout`` gives the keys of each param group in order: an
    :class:`OptimizerLayout` (from :func:`optimizer_layout`) or a plain list of
    lists. Keys come back as the layout spells them (ints stay ints).

    >>> flat = {"state.w.step": 1, "param_groups.w.lr": 0.1}
    >>> unflatten_optimizer([["w"]])(flat)
    {'state': {'w': {'step': 1}}, 'param_groups': [{'lr': 0.1, 'params': ['w']}]}

    Raises (when applied):
        LayoutMismatchError: a key names no parameter of the layout, a
            parameter of the layout has no hyper-parameters, or parameters of
            one group disagree on them.
    """
    return _UnflattenOptimizer(_as_layout(layout, "unflatten_optimizer"))


# -- several optimizers -------------------------------------------------------


@attrs.frozen(repr=False)
class _MergeOptimizers(Transform):
    _factory = "merge_optimizers"

    def __call__(self, osds: Sequence[Mapping[str, Any]], /) -> dict[str, Any]:
        fn = "merge_optimizers"
        if isinstance(osds, Mapping) or not isinstance(osds, Sequence):
            raise TypeError(f"{fn}: expected a sequence of optimizer state dicts, got {type(osds).__name__}.")
        state: dict[Key, Any] = {}
        groups: list[dict[str, Any]] = []
        owner: dict[Key, int] = {}
        for index, osd in enumerate(osds):
            _check_optim(osd, fn)
            keys = list(osd[STATE])
            for group in osd[PG]:
                keys.extend(group[PARAMS])
            for key in dict.fromkeys(keys):
                if key in owner:
                    raise KeyCollisionError(
                        f"{fn}: key {key!r} is in optimizer {owner[key]} and optimizer "
                        f"{index}. Each parameter may belong to one optimizer only."
                    )
                owner[key] = index
            state.update(osd[STATE])
            groups.extend(osd[PG])
        return {STATE: state, PG: groups}


def merge_optimizers() -> Transform:
    """Return a transform that merges several optimizers' state dicts into one:
    ``state`` entries joined, ``param_groups`` concatenated in order (what
    torch's ``get_state_dict`` does with several optimizers).

    >>> a = {"state": {"w": {"step": 1}}, "param_groups": [{"lr": 1, "params": ["w"]}]}
    >>> b = {"state": {}, "param_groups": [{"lr": 2, "params": ["b"]}]}
    >>> merge_optimizers()([a, b])["param_groups"]
    [{'lr': 1, 'params': ['w']}, {'lr': 2, 'params': ['b']}]

    See also: :func:`split_optimizer`.
    """
    return _MergeOptimizers()


@attrs.frozen(repr=False)
class _SplitOptimizer(Transform):
    _factory = "split_optimizer"
    layouts: tuple[OptimizerLayout, ...]

    def __call__(self, osd: Mapping[str, Any], /) -> tuple[dict[str, Any], ...]:
        fn = "split_optimizer"
        _check_optim(osd, fn)
        groups = list(osd[PG])
        expected = sum(len(layout.param_groups) for layout in self.layouts)
        if len(groups) != expected:
            raise LayoutMismatchError(
                f"{fn}: the state dict has {len(groups)} param groups, the layouts "
                f"expect {expected}. Pass the layouts of the optimizers it was merged from."
            )
        owner: dict[Key, int] = {}
        for index, layout in enumerate(self.layouts):
            for keys in layout.param_groups:
                owner.update(dict.fromkeys(keys, index))
        strays = [k for k in osd[STATE] if k not in owner]
        if strays:
            raise LayoutMismatchError(
                f"{fn}: {len(strays)} state key(s) belong to no layout: {preview(strays)}."
            )
        parts = []
        cursor = 0
        for index, layout in enumerate(self.layouts):
            mine = groups[cursor : cursor + len(layout.param_groups)]
            for offset, (group, keys) in enumerate(zip(mine, layout.param_groups)):
                if list(group[PARAMS]) != list(keys):
                    raise LayoutMismatchError(
                        f"{fn}: param group {cursor + offset} holds {preview(group[PARAMS])}, "
                        f"but layout {index} expects {preview(keys)} there."
                    )
            cursor += len(layout.param_groups)
            state = {k: v for k, v in osd[STATE].items() if owner[k] == index}
            parts.append({STATE: state, PG: mine})
        return tuple(parts)

    def inverse(self) -> Transform:
        return merge_optimizers()


def split_optimizer(layouts: Sequence[LayoutLike]) -> Transform:
    """Return a transform that splits a merged optimizer state dict into one
    state dict per optimizer, following ``layouts`` (one per optimizer, in
    the order they were merged).

    >>> merged = {"state": {}, "param_groups": [{"lr": 1, "params": ["w"]}, {"lr": 2, "params": ["b"]}]}
    >>> [p["param_groups"] for p in split_optimizer([[["w"]], [["b"]]])(merged)]
    [[{'lr': 1, 'params': ['w']}], [{'lr': 2, 'params': ['b']}]]

    See also: :func:`merge_optimizers`, its inverse.
    """
    return _SplitOptimizer(tuple(_as_layout(layout, "split_optimizer") for layout in layouts))
