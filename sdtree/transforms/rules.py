"""How a tensor rule applies to every form of state dict.

A *rule* names its source keys with key patterns (:mod:`.patterns`), groups
the keys it matches (one group per binding of the target's placeholders:
``layers.0``, ``layers.1``, ...), and maps each group's tensors to new
tensors with an *op* (concatenate, split, stack, permute, ...) under target
keys. The same rule applies to:

- a model state dict: the group's tensors;
- an FQN-keyed optimizer state dict: every per-parameter entry shaped like
  the parameter (Adam's ``exp_avg`` and ``exp_avg_sq``, SGD's
  ``momentum_buffer``, ...) goes through the same op; scalar entries such
  as ``step`` are carried, and must agree across a group; the FQNs in
  ``param_groups`` follow (the outputs take the place of the first source);
- the flat optimizer form (``state.<fqn>.<name>``), alike;
- ``(model_state_dict, optim_state_dict)``: both, with the parameters' shapes
  read off the model.

Meta tensors go through plans only: the output is a new meta tensor of the
right shape and dtype that remembers how it is derived (:func:`derivation_of`),
so a checkpoint reader can compute it later from the tensors it stands for
(:func:`materialize`). Nothing here mutates its input; outputs are new
tensors (or the input where an op changes nothing).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Callable, NamedTuple, Optional

import torch

from sdtree._tree import tree_flatten
from sdtree.errors import (
    KeyCollisionError,
    LayoutMismatchError,
    NonStringKeyError,
    PatternMatchError,
    TensorMismatchError,
    UnsupportedLeafError,
    preview as _preview,
)
from sdtree.types import PARAMS, PG, PG_DOT, STATE, STATE_DOT, form_of
from sdtree.transforms.compose import Transform
from sdtree.fqn import split_flat_keys
from sdtree.transforms.patterns import KeyPattern, PatternSet, nearest_keys

__all__ = ["Op", "Misfit", "Spec", "Derivation", "derivation_of", "materialize", "Materializer", "TensorRule", "Group"]

Spec = tuple[tuple[int, ...], torch.dtype]  # an output's shape and dtype
_DERIVED = "_sdtree_derivation"
_NAMES = "param_names"  # what optimizers built from named_parameters() keep per group


class Misfit(ValueError):
    """Raised by :meth:`Op.plan`: the inputs do not fit (the message says what
    was expected and found); the rule reports it as a TensorMismatchError."""


class Op:
    """What a rule does to one group's tensors.

    ``plan`` checks the inputs' shapes and dtypes and returns the outputs'
    (raising :class:`Misfit`, in terms of ``names``; ``None`` when only the
    data can tell); ``compute`` does it.
    """

    def plan(self, names: Sequence[str], specs: Sequence[Spec]) -> Optional[list[Spec]]:
        raise NotImplementedError

    def compute(self, tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        raise NotImplementedError


class Derivation(NamedTuple):
    """How meta outputs are computed from the tensors they were planned from
    (``rule``: the factory name of the rule that planned them, for plans;
    ``outputs``: the planned shapes and dtypes). A tuple: one is made per
    planned group, so it is kept cheap."""

    op: Op
    sources: tuple[torch.Tensor, ...]
    rule: str
    outputs: Sequence[Spec]

    def compute(self, fetch: Callable[[torch.Tensor], torch.Tensor]) -> list[torch.Tensor]:
        return self.op.compute([materialize(s, fetch) for s in self.sources])


def derivation_of(tensor: torch.Tensor) -> Optional[tuple[Derivation, int]]:
    """``(derivation, output index)`` of a meta tensor a rule planned, else None."""
    found: Optional[tuple[Derivation, int]] = getattr(tensor, _DERIVED, None)
    return found


def materialize(tensor: torch.Tensor, fetch: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """The data of ``tensor``: computed from its sources if a rule planned it
    (each source read with ``fetch``), else ``fetch(tensor)``."""
    derived = derivation_of(tensor)
    if derived is None:
        return fetch(tensor)
    derivation, index = derived
    return derivation.compute(fetch)[index]


class Materializer:
    """Fetch the tensors of a planned tree one at a time, each group once.

    ``Materializer(tree, fetch)(leaf)`` is ``materialize(leaf, fetch)``, except
    that a group with several outputs (a split, an unstack) is computed once:
    its outputs wait until the last of those in ``tree`` is asked for, then
    are let go. So reading a tree output by output holds at most one group's
    sources and outputs at a time.
    """

    def __init__(self, tree: Any, fetch: Callable[[torch.Tensor], torch.Tensor]) -> None:
        self._fetch = fetch
        wanted: dict[int, int] = {}
        leaves = {id(leaf): leaf for leaf in tree_flatten(tree)[0] if isinstance(leaf, torch.Tensor)}
        for leaf in leaves.values():  # a leaf held under two keys (tied) is fetched once
            derived = derivation_of(leaf)
            if derived is not None:
                wanted[id(derived[0])] = wanted.get(id(derived[0]), 0) + 1
        self._wanted = wanted
        self._held: dict[int, list[torch.Tensor]] = {}

    def __call__(self, tensor: torch.Tensor) -> torch.Tensor:
        derived = derivation_of(tensor)
        if derived is None:
            return self._fetch(tensor)
        derivation, index = derived
        key = id(derivation)
        outputs = self._held.get(key)
        if outputs is None:
            outputs = derivation.op.compute([self(s) for s in derivation.sources])
        left = self._wanted.get(key, 1) - 1
        if left > 0:
            self._wanted[key] = left
            self._held[key] = outputs
        else:
            self._held.pop(key, None)
            self._wanted.pop(key, None)
        return outputs[index]


def _spec(tensor: torch.Tensor) -> Spec:
    return tensor.shape, tensor.dtype  # torch.Size is a tuple


def _run(op: Op, inputs: Sequence[torch.Tensor], planned: Optional[list[Spec]], rule: str) -> list[torch.Tensor]:
    """The outputs of ``op`` on ``inputs`` (planned already): computed, or
    meta tensors that remember their derivation when any input is meta."""
    for t in inputs:
        if t.is_meta:
            break
    else:
        return op.compute(inputs)
    if planned is None:  # a leaf kind the op cannot plan: the caller may load the data and retry
        raise UnsupportedLeafError(f"{op!r} cannot plan meta tensors: it needs their data.")
    derivation = Derivation(op, tuple(inputs), rule, planned)
    outputs = []
    for index, (shape, dtype) in enumerate(planned):
        out = torch.empty(shape, dtype=dtype, device="meta")
        setattr(out, _DERIVED, (derivation, index))
        outputs.append(out)
    return outputs


class Group(NamedTuple):
    """The keys one application of a rule reads, in the order of its sources."""

    binding: tuple[tuple[str, str], ...]  # the target's placeholder values
    members: tuple[str, ...]


def _at(binding: tuple[tuple[str, str], ...]) -> str:
    """Where in the state dict a group is, for an error message."""
    return f"at {', '.join(f'{{{k}}}={v}' for k, v in binding)}: " if binding else ""


def _is_scalar(value: Any) -> bool:
    return not isinstance(value, torch.Tensor) or value.dim() == 0


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (
            isinstance(a, torch.Tensor)
            and isinstance(b, torch.Tensor)
            and a.dtype == b.dtype
            and a.shape == b.shape
            and (a.is_meta or b.is_meta or bool(torch.equal(a, b)))
        )
    return bool(a == b)


def _show(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return repr(value.item()) if value.numel() == 1 and not value.is_meta else f"tensor{tuple(value.shape)}"
    return repr(value)


class TensorRule(Transform):
    """Base class of the tensor transforms: subclasses give the patterns,
    how keys group, the op and the target keys of a group."""

    strict: bool = True
    other_entries: str = "error"

    # -- what subclasses define ---------------------------------------------

    def _sources(self) -> tuple[KeyPattern, ...]:
        raise NotImplementedError

    def _over(self) -> Optional[str]:
        """A placeholder of the source only, whose values order one group (stack)."""
        return None

    def _group_names(self) -> tuple[str, ...]:
        """The placeholders that tell groups apart."""
        return self._sources()[0].names

    def _op(self) -> Op:
        raise NotImplementedError

    def _targets(self, group: Group, n_outputs: int) -> list[str]:
        raise NotImplementedError

    def _pattern_set(self) -> PatternSet:
        raise NotImplementedError

    # -- grouping ------------------------------------------------------------

    def _fail(self, message: str) -> PatternMatchError:
        return PatternMatchError(f"{self!r}: {message}")

    def _plan(self, op: Op, names: Sequence[str], specs: Sequence[Spec]) -> Optional[list[Spec]]:
        try:
            return op.plan(names, specs)
        except Misfit as err:
            raise TensorMismatchError(f"{self!r}: {err}") from None

    def _accepts(self, value: Any) -> bool:
        """Whether a matched key's value is acted on (False: passed through)."""
        return True

    def _groups(self, keys: Sequence[str]) -> list[Group]:
        sources = self._sources()
        over = self._over()
        names = self._group_names()
        patterns = self._pattern_set()
        # per pattern: where each group placeholder (and ``over``) sits among its values
        picks = [tuple(p.names.index(n) for n in names) for p in sources]
        at_over = [p.names.index(over) if over is not None else -1 for p in sources]
        slots: dict[tuple[str, ...], dict[Any, str]] = {}
        match = patterns.match_values
        for key in patterns.candidates(keys):
            found = match(key)
            if found is None:
                continue
            index, values = found
            gid = tuple(values[i] for i in picks[index])
            slot: Any = index if over is None else values[at_over[index]]
            slots.setdefault(gid, {})[slot] = key
        if not slots:
            if self.strict:
                near = nearest_keys(sources, list(keys))
                raise self._fail(
                    f"no key matches {_preview(p.text for p in sources)}"
                    + (f"; the nearest keys are {_preview(near)}" if near else " (the state dict is empty)")
                    + ". Check the patterns, or pass strict=False to allow no match."
                )
            return []
        groups = []
        for gid, found_slots in slots.items():
            where = tuple(zip(names, gid))
            if over is None:
                missing = [p.format(dict(where)) for i, p in enumerate(sources) if i not in found_slots]
                if missing:
                    raise self._fail(
                        f"{_at(where)}found {_preview(found_slots.values())} but not {_preview(missing)}. "
                        "Every group needs all its sources: drop the incomplete group's keys first (drop_keys)."
                    )
                members = tuple(found_slots[i] for i in range(len(sources)))
            else:
                members = self._ordered(where, over, found_slots)
            groups.append(Group(where, members))
        return groups

    def _ordered(self, binding: tuple[tuple[str, str], ...], over: str, found: dict[Any, str]) -> tuple[str, ...]:
        by_index: dict[int, str] = {}
        for value, key in found.items():
            try:
                index = int(value)
            except ValueError:
                raise self._fail(f"{key!r}: {{{over}}} is {value!r}, not an integer index.") from None
            if index in by_index:
                raise self._fail(f"{by_index[index]!r} and {key!r} both have {{{over}}} index {index}.")
            by_index[index] = key
        expected = list(range(len(by_index)))
        if sorted(by_index) != expected:
            gaps = sorted(set(expected) - set(by_index))
            raise self._fail(
                f"{_at(binding)}{{{over}}} indices {sorted(by_index)} are not 0..{len(by_index) - 1} "
                f"(missing {gaps}). Stack needs every index from 0."
            )
        return tuple(by_index[i] for i in expected)

    # -- the forms -------------------------------------------------------------

    def __call__(self, state_dict: Any, /) -> Any:
        if isinstance(state_dict, tuple) and len(state_dict) == 2:
            model, optim = state_dict
            out_model = self(model)
            shapes = {k: tuple(v.shape) for k, v in model.items() if isinstance(v, torch.Tensor)}
            return out_model, self._apply_optimizer(optim, shapes)
        form = form_of(state_dict, self._factory)
        if form == "model":
            return self._apply_model(state_dict)
        return self._apply_optimizer(state_dict, None)

    def _apply_optimizer(self, osd: Any, shapes: Optional[Mapping[str, tuple[int, ...]]]) -> Any:
        form = form_of(osd, self._factory)
        if form == "optim":
            return self._apply_optim(osd, shapes)
        if form == "flat_optim":
            return self._apply_flat(osd, shapes)
        raise LayoutMismatchError(
            f"{self!r}: the second of (model_state_dict, optim_state_dict) is not an optimizer state dict "
            "(neither {'state': ..., 'param_groups': [...]} nor its flat form)."
        )

    def _check_str(self, keys: Sequence[Any]) -> None:
        bad = [k for k in keys if type(k) is not str]
        if bad:
            raise NonStringKeyError(
                f"{self._factory}: {len(bad)} key(s) are not strings: {_preview(bad)}. Tensor transforms name "
                "keys by FQN patterns: apply param_ids_to_fqns(...) to an optimizer state dict first."
            )

    def _apply_model(self, sd: Mapping[str, Any]) -> dict[str, Any]:
        keys = list(sd)
        self._check_str(keys)
        accepts = self._accepts
        try:
            groups = self._groups(keys if type(self)._accepts is TensorRule._accepts else [k for k in keys if accepts(sd[k])])
        except PatternMatchError as err:
            nested = [k for k, v in sd.items() if isinstance(v, Mapping)]
            if not nested:
                raise
            raise PatternMatchError(
                f"{err} The state dict holds nested state dicts ({_preview(nested)}): a combined checkpoint? "
                "Apply the rule inside them with sdtree.transforms.each(rule) or at('model', rule)."
            ) from None
        op = self._op()
        for group in groups:
            bad = [k for k in group.members if not isinstance(sd[k], torch.Tensor)]
            if bad:
                raise UnsupportedLeafError(
                    f"{self!r}: {_preview((f'{k!r} ({type(sd[k]).__name__})' for k in bad), quote=False)} "
                    "is not a tensor. Tensor transforms act on tensors only: narrow the pattern."
                )
        # groups of one model mostly share their shapes (every layer alike): plan each once
        seen: dict[tuple[Spec, ...], Optional[list[Spec]]] = {}
        planned = []
        for g in groups:
            given = tuple(_spec(sd[k]) for k in g.members)
            if given not in seen:
                seen[given] = self._plan(op, g.members, given)
            planned.append(seen[given])
        emitted: dict[str, list[tuple[str, Any]]] = {}
        for group, plan in zip(groups, planned):
            outputs = _run(op, [sd[k] for k in group.members], plan, self._factory)
            emitted[group.members[0]] = list(zip(self._targets(group, len(outputs)), outputs))
        if all(len(e) == 1 and e[0][0] == k for k, e in emitted.items()) and all(len(g.members) == 1 for g in groups):
            # each key maps to itself (permute, cast, ...): copy the dict, replace the values in place
            same = dict(sd)
            same.update(e[0] for e in emitted.values())
            return same
        consumed = {k for g in groups for k in g.members}
        out: dict[str, Any] = {}
        for key, value in sd.items():
            if key not in consumed:
                out[key] = value
            elif key in emitted:
                out.update(emitted[key])
        self._check_collisions(sd, consumed, emitted, len(out))
        return out

    def _check_collisions(self, keys: Any, consumed: set[str], emitted: Mapping[str, list[tuple[str, Any]]], n: int) -> None:
        expected = len(keys) - len(consumed) + sum(len(e) for e in emitted.values())
        if n == expected:
            return
        made = [t for e in emitted.values() for t, _ in e]
        clash = [t for t in made if t in keys and t not in consumed] or [t for t in made if made.count(t) > 1]
        raise KeyCollisionError(
            f"{self!r}: target key(s) {_preview(dict.fromkeys(clash))} already exist or are made twice. "
            "Drop or rename the existing keys first."
        )

    # -- optimizer state -------------------------------------------------------

    def _param_shape(self, fqn: str, entries: Mapping[str, Any], shapes: Optional[Mapping[str, tuple[int, ...]]]) -> Optional[tuple[int, ...]]:
        if shapes is not None and fqn in shapes:
            return shapes[fqn]
        found = {name: tuple(v.shape) for name, v in entries.items() if isinstance(v, torch.Tensor) and v.dim() > 0}
        if len(set(found.values())) > 1:
            raise TensorMismatchError(
                f"{self!r}: the optimizer entries of {fqn!r} have different shapes "
                f"({', '.join(f'{n} {s}' for n, s in found.items())}), so which follow the parameter is unknown. "
                "Apply the transform to (model_state_dict, optim_state_dict) so the parameter's shape is known."
            )
        return next(iter(found.values()), None)

    def _map_entries(
        self, group: Group, entries: list[Optional[Mapping[str, Any]]], shapes: Optional[Mapping[str, tuple[int, ...]]]
    ) -> Optional[tuple[list[str], list[dict[str, Any]]]]:
        """The targets' keys and state entries from the members' (None: no state)."""
        members = group.members
        present = [e is not None for e in entries]
        if not any(present):
            return None
        if not all(present):
            with_state = [m for m, p in zip(members, present) if p]
            without = [m for m, p in zip(members, present) if not p]
            raise TensorMismatchError(
                f"{self!r}: optimizer state exists for {_preview(with_state)} but not for {_preview(without)}."
            )
        full = [e for e in entries if e is not None]
        names = list(full[0])
        for member, entry in zip(members, full):
            if set(entry) != set(names):
                raise TensorMismatchError(
                    f"{self!r}: optimizer entries differ: {members[0]!r} has {sorted(names)}, "
                    f"{member!r} has {sorted(entry)}."
                )
        param_shapes = [self._param_shape(m, e, shapes) for m, e in zip(members, full)]
        op = self._op()
        carried: dict[str, Any] = {}
        mapped: dict[str, list[torch.Tensor]] = {}
        for name in names:
            values = [e[name] for e in full]
            if all(_is_scalar(v) for v in values):
                if not all(_same(v, values[0]) for v in values):
                    shown = ", ".join(f"{m!r} has {_show(v)}" for m, v in zip(members, values))
                    raise TensorMismatchError(
                        f"{self!r}: optimizer entry {name!r} differs within the group ({shown}); "
                        "the parameters cannot share one entry. Align them (or drop the entry) first."
                    )
                carried[name] = values[0]
                continue
            shaped = [
                isinstance(v, torch.Tensor) and v.dim() > 0 and tuple(v.shape) == s for v, s in zip(values, param_shapes)
            ]
            if not all(shaped):
                if self.other_entries == "drop":
                    continue
                detail = ", ".join(
                    f"{m!r}: {_show(v)} (parameter {s})" for m, v, s in zip(members, values, param_shapes)
                )
                raise TensorMismatchError(
                    f"{self!r}: optimizer entry {name!r} is not shaped like its parameter ({detail}), so how the "
                    "rule applies to it is unknown (factored or quantized state?). Pass other_entries='drop' "
                    "to drop such entries, or convert them first."
                )
            labels = [f"{m} ({name})" for m in members]
            mapped[name] = _run(op, values, self._plan(op, labels, [_spec(v) for v in values]), self._factory)
        counts = {len(v) for v in mapped.values()}
        n = counts.pop() if counts else self._n_outputs(group, param_shapes)
        targets = self._targets(group, n)
        out: list[dict[str, Any]] = [{} for _ in targets]
        for name in names:
            for j, entry in enumerate(out):
                if name in carried:
                    entry[name] = carried[name]
                elif name in mapped:
                    entry[name] = mapped[name][j]
        return targets, out

    def _n_outputs(self, group: Group, param_shapes: Sequence[Optional[tuple[int, ...]]]) -> int:
        """How many outputs a group has, when no tensor of it is at hand:
        fixed by the rule, or planned from the parameters' shapes."""
        fixed = self._fixed_outputs()
        if fixed is not None:
            return fixed
        if all(s is not None for s in param_shapes):
            planned = self._plan(self._op(), group.members, [(s, torch.float32) for s in param_shapes if s is not None])
            if planned is not None:
                return len(planned)
        raise TensorMismatchError(
            f"{self!r}: the optimizer state of {_preview(group.members)} holds no tensor, so the number of "
            "outputs is unknown. Apply the transform to (model_state_dict, optim_state_dict)."
        )

    def _fixed_outputs(self) -> Optional[int]:
        """The number of outputs of every group, if the rule fixes it."""
        return None

    def _shapes(self, group: Group, shapes: Optional[Mapping[str, tuple[int, ...]]]) -> list[Optional[tuple[int, ...]]]:
        return [shapes.get(k) if shapes is not None else None for k in group.members]

    def _group_index(self, groups: list[Group]) -> dict[str, int]:
        return {k: i for i, g in enumerate(groups) for k in g.members}

    def _apply_optim(self, osd: Mapping[str, Any], shapes: Optional[Mapping[str, tuple[int, ...]]]) -> dict[str, Any]:
        state, param_groups = osd[STATE], osd[PG]
        fqns = dict.fromkeys(k for g in param_groups for k in g[PARAMS])
        fqns.update(dict.fromkeys(state))
        keys = list(fqns)
        self._check_str(keys)
        groups = self._groups(keys)
        where = {fqn: i for i, g in enumerate(param_groups) for fqn in g[PARAMS]}
        for group in groups:
            places = {where.get(m) for m in group.members}
            if len(places) > 1:
                shown = ", ".join(f"{m!r} in {where.get(m)}" for m in group.members)
                raise LayoutMismatchError(
                    f"{self!r}: the sources of one group are in different param groups ({shown}); "
                    "one parameter has one set of hyper-parameters. Put them in one group first."
                )
        mapped = [self._map_entries(g, [state.get(m) for m in g.members], shapes) for g in groups]
        targets_of = [m[0] if m is not None else self._targets(g, self._n_outputs(g, self._shapes(g, shapes))) for g, m in zip(groups, mapped)]
        index = self._group_index(groups)
        new_state: dict[str, Any] = {}
        emitted: dict[str, list[tuple[str, Any]]] = {}
        for g, m in zip(groups, mapped):
            if m is not None:
                emitted[g.members[0]] = list(zip(*m))
        for key, value in state.items():
            i = index.get(key)
            if i is None:
                new_state[key] = value
            elif key in emitted:
                new_state.update(emitted[key])
        self._check_collisions(state, {k for k in state if k in index}, emitted, len(new_state))
        new_groups = []
        for param_group in param_groups:
            params: list[str] = []
            for fqn in param_group[PARAMS]:
                i = index.get(fqn)
                if i is None:
                    params.append(fqn)
                elif fqn == groups[i].members[0]:
                    params.extend(targets_of[i])
            new_group = {**param_group, PARAMS: params}
            if param_group.get(_NAMES) == param_group[PARAMS]:  # FQNs in both: names follow
                new_group[_NAMES] = list(params)
            new_groups.append(new_group)
        return {STATE: new_state, PG: new_groups}

    def _apply_flat(self, flat: Mapping[str, Any], shapes: Optional[Mapping[str, tuple[int, ...]]]) -> dict[str, Any]:
        parsed = split_flat_keys(flat, self._factory)
        keys = list(dict.fromkeys(fqn for _, fqn, _ in parsed))
        groups = self._groups(keys)
        index = self._group_index(groups)
        state: dict[str, dict[str, Any]] = {}
        hypers: dict[str, dict[str, Any]] = {}
        for (section, fqn, rest), value in zip(parsed, flat.values()):
            if fqn in index:
                (state if section == STATE_DOT else hypers).setdefault(fqn, {})[rest] = value
        for group in groups:
            first = hypers.get(group.members[0], {})
            for member in group.members[1:]:
                other = hypers.get(member, {})
                if set(other) != set(first) or not all(_same(first[h], other[h]) for h in first):
                    raise LayoutMismatchError(
                        f"{self!r}: {group.members[0]!r} and {member!r} are in different param groups "
                        "(their hyper-parameters differ); one parameter has one set. Put them in one group first."
                    )
        mapped = [self._map_entries(g, [state.get(m) for m in g.members], shapes) for g in groups]
        out: dict[str, Any] = {}
        n_out = 0
        done: set[tuple[int, str]] = set()  # (group, section) already written
        for (section, fqn, rest), (key, value) in zip(parsed, flat.items()):
            i = index.get(fqn)
            if i is None:
                out[key] = value
                n_out += 1
                continue
            if (i, section) in done:
                continue
            done.add((i, section))
            group, m = groups[i], mapped[i]
            if m is None:
                targets = self._targets(group, self._n_outputs(group, self._shapes(group, shapes)))
                entries: list[dict[str, Any]] = [{} for _ in targets]
            else:
                targets, entries = m
            # each target's entries (or hyper-parameters) together, where the group's section began
            for target, entry in zip(targets, entries):
                items = entry if section == STATE_DOT else hypers.get(group.members[0], {})
                for name, item in items.items():
                    out[f"{section}{target}.{name}"] = item
                    n_out += 1
        if len(out) != n_out:
            raise KeyCollisionError(f"{self!r}: target keys already exist in the flat optimizer state dict. Drop them first.")
        return out
