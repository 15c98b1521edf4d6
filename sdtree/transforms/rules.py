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

Meta tensors go through plans only (:mod:`.plans`): the output is a new meta
tensor of the right shape and dtype that remembers how it is derived
(:func:`derivation_of`), so a checkpoint reader can compute it later from the
tensors it stands for (:func:`materialize`); inside a pipeline, a pending
output when the next step never reads values. Nothing here mutates its
input; outputs are new tensors (or the input where an op changes nothing).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from functools import partial
from itertools import chain
from typing import Any, Optional, Union

import torch

from sdtree.errors import (
    KeyCollisionError,
    LayoutMismatchError,
    NonStringKeyError,
    PatternMatchError,
    TensorMismatchError,
    UnsupportedLeafError,
    preview as _preview,
)
from sdtree.types import PARAMS, PG, STATE, STATE_DOT, form_of
from sdtree.transforms.compose import Transform
from sdtree.transforms.groups import Group, Grouping, in_order, in_turn
from sdtree.fqn import split_flat_keys
from sdtree.transforms.patterns import KeyPattern, PatternSet, nearest_keys, non_str
from sdtree.transforms.plans import Derivation, Materializer, Misfit, Op, Pending, Planned, Spec, derivation_of
from sdtree.transforms.plans import Columns, materialize, meta_outputs, plan_fused, plan_in_place

__all__ = ["Op", "Misfit", "Spec", "Derivation", "derivation_of", "materialize", "Materializer", "TensorRule", "Group", "Grouping"]

_NAMES = "param_names"  # what optimizers built from named_parameters() keep per group
_PLANNED = (torch.Tensor, Pending)  # what a rule acts on: a tensor, or inside a pipeline a pending output
_UNSEEN: Any = object()


def _spec(tensor: Planned) -> Spec:
    return tensor.shape, tensor.dtype  # torch.Size is a tuple


def _run(
    op: Op, inputs: Sequence[Planned], planned: Optional[list[Spec]], rule: str, pending: bool = False,
    protos: Optional[dict[Spec, torch.Tensor]] = None,
) -> list[Any]:
    """The outputs of ``op`` on ``inputs`` (planned already): computed, or
    planned outputs that remember their derivation when any input is meta
    (pending ones if ``pending``)."""
    for t in inputs:
        if t.is_meta:
            break
    else:
        return op.compute(inputs)  # type: ignore[arg-type]  # no input is pending
    if planned is None:  # a leaf kind the op cannot plan: the caller may load the data and retry
        raise UnsupportedLeafError(f"{op!r} cannot plan meta tensors: it needs their data.")
    derivation = tuple.__new__(Derivation, (op, tuple(inputs), rule, planned))  # as Derivation(...), one call less
    return meta_outputs(derivation, pending, {} if protos is None else protos)


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
        return self._grouped(keys).groups()

    def _grouped(self, keys: Sequence[str]) -> Grouping:
        """The groups of ``keys``, as columns."""
        sources = self._sources()
        over = self._over()
        names = self._group_names()
        at, indices, values = self._pattern_set().bindings(keys, names if over is None else (*names, over))
        if not at:
            if self.strict:
                near = nearest_keys(sources, list(keys))
                raise self._fail(
                    f"no key matches {_preview(p.text for p in sources)}"
                    + (f"; the nearest keys are {_preview(near)}" if near else " (the state dict is empty)")
                    + ". Check the patterns, or pass strict=False to allow no match."
                )
            return Grouping(names, [], [], [])
        matched = list(map(keys.__getitem__, at))
        if over is not None:
            by_gid: dict[tuple[str, ...], dict[str, str]] = {}
            for key, gid in zip(matched, values):
                by_gid.setdefault(gid[:-1], {})[gid[-1]] = key
            gids = list(by_gid)
            ordered = [self._ordered(tuple(zip(names, gid)), over, by_gid[gid]) for gid in gids]
            return Grouping(names, gids, ordered, None)
        n = len(sources)
        if n == 1 and len(names) == len(sources[0].names):  # one key a group, told apart by all its values
            return Grouping(names, values, list(zip(matched)), at)
        if in_turn(indices, values, n):  # each group's keys together, in the sources' order: sliced in C
            members_in_turn = list(zip(*(matched[i::n] for i in range(n))))
            return Grouping(names, values[::n], members_in_turn, at)
        # a group's keys by pattern (the group: the values of the target's placeholders)
        members: dict[tuple[str, ...], list[Optional[str]]] = {}
        get = members.get
        for key, index, gid in zip(matched, indices, values):
            slot = get(gid)
            if slot is None:
                slot = members[gid] = [None] * n
            slot[index] = key
        for gid, slot in members.items():
            if None in slot:
                where = tuple(zip(names, gid))
                missing = [p.format(dict(where)) for p, k in zip(sources, slot) if k is None]
                raise self._fail(
                    f"{_at(where)}found {_preview(k for k in slot if k is not None)} but not {_preview(missing)}. "
                    "Every group needs all its sources: drop the incomplete group's keys first (drop_keys)."
                )
        position = dict(zip(matched, at))
        complete: list[tuple[str, ...]] = list(map(tuple, members.values()))  # type: ignore[arg-type]  # no None left
        return Grouping(names, list(members), complete, list(map(position.__getitem__, chain.from_iterable(complete))))

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

    _takes_pending = True  # inside a pipeline, it plans pending inputs as meta ones (plans.Pending)

    def __call__(self, state_dict: Any, /) -> Any:
        return self._call(state_dict, False)

    def _call(self, state_dict: Any, pending: bool) -> Any:
        if isinstance(state_dict, tuple) and len(state_dict) == 2:
            model, optim = state_dict
            out_model = self._call(model, pending)
            shapes = {k: tuple(v.shape) for k, v in model.items() if isinstance(v, _PLANNED)}
            return out_model, self._apply_optimizer(optim, shapes)
        if type(state_dict) is Columns or form_of(state_dict, self._factory) == "model":
            return self._apply_model(state_dict, pending)
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
        bad = non_str(keys)
        if bad:
            raise NonStringKeyError(
                f"{self._factory}: {len(bad)} key(s) are not strings: {_preview(bad)}. Tensor transforms name "
                "keys by FQN patterns: apply param_ids_to_fqns(...) to an optimizer state dict first."
            )

    def _in_place(self) -> bool:
        """Whether each group is one key that maps to itself (permute, cast, ...)."""
        return False

    def _apply_model(self, sd: Union[Mapping[str, Any], Columns], pending: bool = False) -> Union[dict[str, Any], Columns]:
        """The rule applied to a model state dict: a dict, or (with
        ``pending``) :class:`~sdtree.transforms.plans.Columns` where its
        outputs are planned in bulk."""
        if isinstance(sd, Columns):  # keys a step before this one checked
            keys, values = sd.keys, sd.values
        else:
            keys, values = list(sd), list(sd.values())
            self._check_str(keys)
        accepts = self._accepts
        try:
            if type(self)._accepts is TensorRule._accepts:
                grouping = self._grouped(keys)
            else:
                grouping = self._grouped([k for k, v in zip(keys, values) if accepts(v)])._replace(positions=None)
        except PatternMatchError as err:
            nested = [k for k, v in zip(keys, values) if isinstance(v, Mapping)]
            if not nested:
                raise
            raise PatternMatchError(
                f"{err} The state dict holds nested state dicts ({_preview(nested)}): a combined checkpoint? "
                "Apply the rule inside them with sdtree.transforms.each(rule) or at('model', rule)."
            ) from None
        positions = grouping.positions
        if positions is None and grouping.members:
            index = dict(zip(keys, range(len(keys))))
            positions = list(map(index.__getitem__, chain.from_iterable(grouping.members)))
        bulk = None if positions is None else self._plan_bulk(keys, values, grouping, positions, pending)
        if bulk is not None:
            return bulk
        return self._apply_each(dict(zip(keys, values)) if isinstance(sd, Columns) else sd, grouping, positions, pending)

    def _plan_bulk(
        self, keys: list[str], values: list[Any], grouping: Grouping, positions: list[int], pending: bool
    ) -> Union[dict[str, Any], Columns, None]:
        """The rule's outputs planned for all groups at once, where every input
        is meta or pending (else None)."""
        op = self._op()
        plan_one = partial(self._plan, op)
        if self._in_place():
            same = plan_in_place(values, keys, positions, op, plan_one, self._factory, pending)
            if same is None:
                return None
            return Columns(keys, same) if pending else dict(zip(keys, same))
        single = self._single_targets(grouping)
        fused = None if single is None else plan_fused(
            keys, values, grouping.members, positions, single, op, plan_one, self._factory, pending
        )
        if fused is None:
            return None
        return Columns(*fused) if pending else dict(zip(*fused))

    def _apply_each(
        self, sd: Mapping[str, Any], grouping: Grouping, positions: Optional[list[int]], pending: bool
    ) -> dict[str, Any]:
        """The rule applied group by group: real tensors computed, meta ones
        planned where the bulk planning cannot (a group of several outputs,
        a target that clashes: named here)."""
        op, keys = self._op(), list(sd)
        groups = grouping.groups()
        where = None if positions is None else dict(zip(chain.from_iterable(grouping.members), positions))
        inputs = [[sd[k] for k in g.members] for g in groups]
        for group, values in zip(groups, inputs):
            for value in values:
                if not isinstance(value, _PLANNED):
                    bad = [k for k, v in zip(group.members, values) if not isinstance(v, _PLANNED)]
                    raise UnsupportedLeafError(
                        f"{self!r}: {_preview((f'{k!r} ({type(sd[k]).__name__})' for k in bad), quote=False)} "
                        "is not a tensor. Tensor transforms act on tensors only: narrow the pattern."
                    )
        # groups of one model mostly share their shapes (every layer alike): plan each once
        seen: dict[tuple[Spec, ...], Optional[list[Spec]]] = {}
        planned = []
        for g, values in zip(groups, inputs):
            given = tuple([(v.shape, v.dtype) for v in values])
            plan = seen.get(given, _UNSEEN)
            if plan is _UNSEEN:
                plan = seen[given] = self._plan(op, g.members, given)
            planned.append(plan)
        protos: dict[Spec, torch.Tensor] = {}
        rule, targets = self._factory, self._targets
        if self._in_place():  # each key maps to itself: copy the dict, replace the values in place
            same = dict(sd)
            for group, values, plan in zip(groups, inputs, planned):
                same[group.members[0]] = _run(op, values, plan, rule, pending, protos)[0]
            return same
        emitted: dict[str, list[tuple[str, Any]]] = {}
        for group, values, plan in zip(groups, inputs, planned):
            outputs = _run(op, values, plan, rule, pending, protos)
            emitted[group.members[0]] = list(zip(targets(group, len(outputs)), outputs))
        consumed = {k for g in groups for k in g.members}
        if all(len(e) == 1 for e in emitted.values()):
            out = in_order(keys, list(sd.values()), groups, emitted, where)
        else:
            out = {}
            get = emitted.get
            for key, value in sd.items():
                made = get(key)
                if made is not None:
                    out.update(made)
                elif key not in consumed:
                    out[key] = value
        self._check_collisions(sd, consumed, emitted, len(out))
        return out

    def _single_targets(self, grouping: Grouping) -> Optional[list[str]]:
        """The one target key of each group, for rules with one target (else None)."""
        return None

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
