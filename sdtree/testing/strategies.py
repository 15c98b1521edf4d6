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

__all__ = ["fqns", "tensors", "state_dicts", "optimizer_state_dicts", "DTYPES"]

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
