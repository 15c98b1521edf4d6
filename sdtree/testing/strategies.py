"""Hypothesis strategies for state dicts, shipped for users' own property tests.

>>> from hypothesis import given
>>> from sdtree.testing import state_dicts
>>> @given(state_dicts())
... def test_round_trip(sd): ...
"""

from __future__ import annotations

from typing import Any, Literal, Optional

import torch
from hypothesis import strategies as st

__all__ = [
    "fqns",
    "tensors",
    "state_dicts",
    "optimizer_state_dicts",
    "fusable_state_dicts",
    "stackable_state_dicts",
    "DTYPES",
]

DTYPES = (
    torch.float32,
    torch.float64,
    torch.float16,
    torch.bfloat16,
    torch.int64,
    torch.int32,
    torch.int8,
    torch.uint8,
    torch.bool,
    torch.complex64,
)

_SEGMENT = st.one_of(
    st.from_regex(r"[a-z_][a-z0-9_]{0,5}", fullmatch=True),
    st.integers(0, 12).map(str),
)


def fqns(*, min_segments: int = 1, max_segments: int = 4) -> st.SearchStrategy[str]:
    """Dotted names like ``"layers.0.attn.weight"``."""
    return st.lists(_SEGMENT, min_size=min_segments, max_size=max_segments).map(".".join)


def _fqn_set(min_size: int, max_size: int) -> st.SearchStrategy[list[str]]:
    """Distinct FQNs, none a dotted prefix of another (as in a real model)."""

    def prefix_free(names: list[str]) -> bool:
        chosen = set(names)
        return not any(
            ".".join(n.split(".")[:i]) in chosen for n in names for i in range(1, n.count(".") + 1)
        )

    return st.lists(fqns(), min_size=min_size, max_size=max_size, unique=True).filter(prefix_free)


@st.composite
def tensors(draw: Any, *, dtypes: tuple[torch.dtype, ...] = DTYPES, max_dims: int = 3) -> torch.Tensor:
    """Small CPU tensors of several dtypes and shapes, including 0-dim and empty ones."""
    dtype = draw(st.sampled_from(dtypes))
    shape = draw(st.lists(st.integers(0, 3), min_size=0, max_size=max_dims))
    seed = draw(st.integers(0, 2**16))
    generator = torch.Generator().manual_seed(seed)
    if dtype.is_floating_point or dtype.is_complex:
        return torch.randn(shape, generator=generator, dtype=torch.float64).to(dtype)
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=generator).bool()
    return torch.randint(0, 100, shape, generator=generator).to(dtype)


_SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**40), 2**40),
    st.floats(allow_nan=False, width=32),
    st.text(max_size=5),
)
_NESTED = st.recursive(
    _SCALARS,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3),
        st.lists(inner, max_size=3).map(tuple),
        st.dictionaries(st.text("abc", min_size=1, max_size=3), inner, max_size=3),
    ),
    max_leaves=6,
)


@st.composite
def state_dicts(
    draw: Any,
    *,
    min_size: int = 0,
    max_size: int = 8,
    tensors_only: bool = False,
    shared: bool = True,
) -> dict[str, Any]:
    """Model state dicts: ``{fqn: leaf}``.

    Leaves are tensors of several dtypes (some keys may share one tensor
    object, as tied weights do), and unless ``tensors_only``, scalars, strings,
    ``None`` and nested lists, tuples and dicts of them (as ``_extra_state``
    holds).
    """
    keys = draw(_fqn_set(min_size, max_size))
    leaf = tensors() if tensors_only else st.one_of(tensors(), tensors(), _NESTED)
    out: dict[str, Any] = {}
    for key in keys:
        if shared and out and draw(st.integers(0, 5)) == 0:
            tensor_keys = [k for k, v in out.items() if isinstance(v, torch.Tensor)]
            if tensor_keys:
                out[key] = out[draw(st.sampled_from(tensor_keys))]
                continue
        out[key] = draw(leaf)
    return out


_HYPERS = st.fixed_dictionaries(
    {"lr": st.floats(0, 1, width=32), "weight_decay": st.sampled_from([0.0, 0.01])},
    optional={
        "betas": st.tuples(st.floats(0, 1, width=32), st.floats(0, 1, width=32)),
        "momentum": st.sampled_from([0.0, 0.9]),
        "foreach": st.sampled_from([None, True, False]),
        "initial_lr": st.floats(0, 1, width=32),
        "eps": st.just(1e-8),
        "nesterov": st.booleans(),
        "param_names": st.just([]),  # replaced below with the group's FQNs
    },
)


@st.composite
def _state_entry(draw: Any, nested: bool) -> dict[str, Any]:
    entry: dict[str, Any] = {}
    names = draw(st.lists(st.sampled_from(["step", "exp_avg", "exp_avg_sq", "momentum_buffer"]), unique=True, max_size=3))
    for name in names:
        if name == "step":
            entry[name] = draw(st.one_of(st.integers(0, 1000), tensors(dtypes=(torch.float32,), max_dims=0)))
        else:
            entry[name] = draw(tensors(dtypes=(torch.float32, torch.bfloat16)))
    if nested and draw(st.booleans()):
        entry["preconditioner"] = {
            "factor_0": draw(tensors(dtypes=(torch.float32,))),
            "stats": {"count": draw(st.integers(0, 9)), "decay": draw(st.floats(0, 1, width=32))},
        }
    return entry


@st.composite
def optimizer_state_dicts(
    draw: Any,
    *,
    keys: Optional[Literal["int", "str"]] = None,
    max_params: int = 6,
    max_groups: int = 3,
    nested_state: bool = True,
) -> dict[str, Any]:
    """Optimizer state dicts ``{"state": ..., "param_groups": [...]}``.

    Several param groups with different hyper-parameters (some groups empty),
    keys that are parameter ids (``keys="int"``, numbered in group order as
    ``Optimizer.state_dict()`` does) or FQNs (``keys="str"``), state for some
    parameters only (some entries empty), 0-dim and shaped tensors, and with
    ``nested_state`` nested dicts inside state entries (as Shampoo keeps).
    Every value is one that torch's flat optimizer form can hold.
    """
    kind = keys or draw(st.sampled_from(["int", "str"]))
    names = draw(_fqn_set(0, max_params))
    ids: list[Any] = list(range(len(names))) if kind == "int" else names
    n_groups = draw(st.integers(1, max_groups))
    cuts = sorted(draw(st.lists(st.integers(0, len(ids)), min_size=n_groups - 1, max_size=n_groups - 1)))
    bounds = [0, *cuts, len(ids)]
    groups = []
    for start, stop in zip(bounds, bounds[1:]):
        group = dict(draw(_HYPERS))
        if "param_names" in group:
            group["param_names"] = names[start:stop]
        group["params"] = ids[start:stop]
        groups.append(group)
    state: dict[Any, Any] = {}
    for key in draw(st.permutations(ids)):
        if draw(st.integers(0, 3)) > 0:
            state[key] = draw(_state_entry(nested_state))
    return {"state": state, "param_groups": groups}


# -- families of keys for the tensor transforms ---------------------------------

_FLOATS = (torch.float32, torch.float64, torch.bfloat16)
_PREFIX = st.sampled_from(["blocks", "model.layers", "enc.h"])


def _randn(shape: tuple[int, ...], dtype: torch.dtype, seed: int) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(dtype)


def _adam_state(draw: Any, model: dict[str, torch.Tensor], groups: list[list[str]]) -> dict[str, Any]:
    """An FQN-keyed Adam-like optimizer state for ``model``: moments shaped
    like their parameter, one ``step`` per group of ``groups`` (the keys a
    rule reads together), some groups without state yet."""
    state: dict[str, Any] = {}
    seed = draw(st.integers(0, 2**16))
    for members in groups:
        if draw(st.integers(0, 4)) == 0:
            continue  # no state yet
        step = draw(st.one_of(st.integers(1, 99).map(lambda s: torch.tensor(float(s))), st.integers(1, 99)))
        for key in members:
            seed += 1
            value = model[key]
            state[key] = {"step": step, "exp_avg": _randn(tuple(value.shape), value.dtype, seed), "exp_avg_sq": _randn(tuple(value.shape), value.dtype, seed + 7).abs()}
    others = [k for k in model if not any(k in g for g in groups)]
    param_groups = [{"params": [k for g in groups for k in g], "lr": 0.1, "betas": (0.9, 0.999)}]
    if others:
        param_groups.append({"params": others, "lr": 0.01, "betas": (0.9, 0.999)})
    return {"state": state, "param_groups": param_groups}


@st.composite
def _others(draw: Any) -> dict[str, torch.Tensor]:
    """Unrelated keys beside a family (they must pass through untouched)."""
    names = draw(st.lists(st.sampled_from(["norm.weight", "head.bias", "emb.weight"]), unique=True, max_size=2))
    return {f"other.{name}": draw(tensors(dtypes=(torch.float32,), max_dims=2)) for name in names}


@st.composite
def fusable_state_dicts(draw: Any) -> tuple[dict[str, Any], dict[str, Any], Any]:
    """``(model_state_dict, optim_state_dict, rule)``: a family of keys
    ``<prefix>.<i>.p<j>.w`` that ``rule``, a :func:`~sdtree.transforms.fuse`
    with ``sizes`` (so invertible), fuses into ``<prefix>.<i>.fused.w`` along
    a dimension where the parts' sizes differ, with FQN-keyed Adam-like state
    shaped like each parameter (equal ``step`` within a group)."""
    from sdtree.transforms import fuse

    prefix = draw(_PREFIX)
    layers = draw(st.integers(1, 3))
    parts = draw(st.integers(2, 3))
    ndim = draw(st.integers(1, 3))  # at least one dimension, to fuse along
    dim = draw(st.integers(0, ndim - 1))
    rest = draw(st.lists(st.integers(1, 3), min_size=ndim - 1, max_size=ndim - 1))
    sizes = tuple(draw(st.lists(st.integers(1, 3), min_size=parts, max_size=parts)))
    dtype = draw(st.sampled_from(_FLOATS))
    model: dict[str, Any] = dict(draw(_others()))
    groups = []
    seed = draw(st.integers(0, 2**16))
    for i in range(layers):
        members = []
        for j in range(parts):
            shape = (*rest[:dim], sizes[j], *rest[dim:])
            key = f"{prefix}.{i}.p{j}.w"
            model[key] = _randn(shape, dtype, seed + 31 * i + j)
            members.append(key)
        groups.append(members)
    rule = fuse([f"{prefix}.{{i}}.p{j}.w" for j in range(parts)], f"{prefix}.{{i}}.fused.w", dim=dim, sizes=sizes)
    return model, _adam_state(draw, model, groups), rule


@st.composite
def stackable_state_dicts(draw: Any) -> tuple[dict[str, Any], dict[str, Any], Any]:
    """``(model_state_dict, optim_state_dict, rule)``: per-expert keys
    ``<prefix>.<i>.experts.<e>.w`` (in index order, as a model has them) that ``rule``, a
    :func:`~sdtree.transforms.stack` over ``e``, stacks into
    ``<prefix>.<i>.experts.w`` along a new dimension, with Adam-like state."""
    from sdtree.transforms import stack

    prefix = draw(_PREFIX)
    layers = draw(st.integers(1, 2))
    experts = draw(st.integers(1, 12))
    # parameters of at least one dimension: a 0-dim parameter's moments look like its step
    shape = tuple(draw(st.lists(st.integers(1, 3), min_size=1, max_size=2)))
    dim = draw(st.integers(0, len(shape)))
    dtype = draw(st.sampled_from(_FLOATS))
    model: dict[str, Any] = dict(draw(_others()))
    groups = []
    for i in range(layers):
        members = [f"{prefix}.{i}.experts.{e}.w" for e in range(experts)]
        for e, key in enumerate(members):
            model[key] = _randn(shape, dtype, 1000 * i + e)
        groups.append(members)
    rule = stack(f"{prefix}.{{i}}.experts.{{e}}.w", f"{prefix}.{{i}}.experts.w", over="e", dim=dim)
    return model, _adam_state(draw, model, groups), rule
