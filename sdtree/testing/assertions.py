"""``assert_state_dict_equal``: equality of state dicts with a readable diff."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from sdtree._tree import tree_flatten_with_accessor

__all__ = ["assert_state_dict_equal"]


def assert_state_dict_equal(
    actual: Any,
    expected: Any,
    *,
    rtol: float = 0.0,
    atol: float = 0.0,
    equal_nan: bool = True,
    check_device: bool = False,
    max_problems: int = 10,
) -> None:
    """Assert that two state dicts (model, optimizer, flat or nested) are equal.

    Equal means the same keys (order aside), the same container types (a
    tuple is not a list), and at every leaf the same type and value; tensors
    also need the same shape and dtype (and device with ``check_device``),
    and values within ``rtol``/``atol`` (exact by default; NaN equals NaN).

    Raises:
        AssertionError: listing missing and unexpected keys, then every
            leaf that differs (up to ``max_problems``), with the first
            differing element of each tensor.
    """
    a_acc, a_leaves, a_spec = tree_flatten_with_accessor(actual)
    b_acc, b_leaves, b_spec = tree_flatten_with_accessor(expected)
    a_map = {acc.codify("sd"): (acc, leaf) for acc, leaf in zip(a_acc, a_leaves)}
    b_map = {acc.codify("sd"): (acc, leaf) for acc, leaf in zip(b_acc, b_leaves)}
    problems = []
    missing = [p for p in b_map if p not in a_map]
    unexpected = [p for p in a_map if p not in b_map]
    if missing:
        problems.append(f"missing (in expected, not in actual): {_short(missing)}")
    if unexpected:
        problems.append(f"unexpected (in actual, not in expected): {_short(unexpected)}")
    for path, (acc, leaf) in a_map.items():
        if path not in b_map:
            continue
        other_acc, other = b_map[path]
        containers = [_kind(e.type) for e in acc]
        other_containers = [_kind(e.type) for e in other_acc]
        if containers != other_containers:
            problems.append(f"{path}: containers {containers} vs {other_containers}")
            continue
        problem = _leaf_problem(leaf, other, rtol, atol, equal_nan, check_device)
        if problem:
            problems.append(f"{path}: {problem}")
    if not problems and not _same_spec(actual, expected):
        problems.append(f"structure differs: actual {a_spec} vs expected {b_spec}")
    if problems:
        shown = problems[:max_problems]
        more = len(problems) - len(shown)
        lines = "\n  ".join(shown) + (f"\n  ... and {more} more" if more else "")
        raise AssertionError(f"state dicts differ ({len(problems)} problem(s)):\n  {lines}")


def _kind(container: type) -> str:
    """Name a container type; every mapping counts as ``dict``."""
    return "dict" if issubclass(container, Mapping) else container.__name__


def _same_spec(actual: Any, expected: Any) -> bool:
    """Compare structures, empty containers included, every mapping as ``dict``."""
    return bool(_skeleton(actual) == _skeleton(expected))


def _skeleton(tree: Any) -> Any:
    if isinstance(tree, Mapping):
        return {k: _skeleton(v) for k, v in tree.items()}
    if isinstance(tree, list):
        return [_skeleton(v) for v in tree]
    if isinstance(tree, tuple):
        return tuple(_skeleton(v) for v in tree)
    return 0


def _short(items: list[str], limit: int = 5) -> str:
    text = ", ".join(items[:limit])
    return text + (f", ... ({len(items) - limit} more)" if len(items) > limit else "")


def _leaf_problem(
    a: Any, b: Any, rtol: float, atol: float, equal_nan: bool, check_device: bool
) -> str | None:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)):
            return f"type {type(a).__name__} vs {type(b).__name__}"
        if a.shape != b.shape:
            return f"shape {tuple(a.shape)} vs {tuple(b.shape)}"
        if a.dtype != b.dtype:
            return f"dtype {a.dtype} vs {b.dtype}"
        if check_device and a.device != b.device:
            return f"device {a.device} vs {b.device}"
        if a.is_meta or b.is_meta:
            return None if a.is_meta and b.is_meta else "meta vs materialised tensor"
        return _value_problem(a, b, rtol, atol, equal_nan)
    if type(a) is not type(b):
        return f"type {type(a).__name__} ({a!r}) vs {type(b).__name__} ({b!r})"
    try:
        same = bool(a == b)
    except Exception:  # an object whose == does not give a bool
        same = a is b
    if not same and not (equal_nan and isinstance(a, float) and a != a and b != b):
        return f"value {a!r} vs {b!r}"
    return None


def _value_problem(a: torch.Tensor, b: torch.Tensor, rtol: float, atol: float, equal_nan: bool) -> str | None:
    a_cpu, b_cpu = a.detach().cpu(), b.detach().cpu()
    if a_cpu.dtype == torch.bool or not (a_cpu.is_floating_point() or a_cpu.is_complex()):
        close = a_cpu == b_cpu if rtol == 0 and atol == 0 else torch.isclose(
            a_cpu.double(), b_cpu.double(), rtol=rtol, atol=atol
        )
    else:
        close = torch.isclose(a_cpu, b_cpu, rtol=rtol, atol=atol, equal_nan=equal_nan)
    if bool(close.all()):
        return None
    bad = (~close).nonzero()
    first = tuple(int(i) for i in bad[0]) if a_cpu.dim() else ()
    index = first if first else ()
    return (
        f"values differ at index {index}: {a_cpu[index].item()!r} vs {b_cpu[index].item()!r} "
        f"({bad.shape[0]} of {a_cpu.numel()} element(s) differ)"
    )
