"""Describe a checkpoint, and compare two, reading one tensor at a time."""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, Literal

import attrs
import torch

from sdtree._tree import codify, tree_flatten_with_path
from sdtree.checkpoint._api import open_checkpoint
from sdtree.checkpoint._formats import Format, PathLike
from sdtree.checkpoint._lazy import Checkpoint, ShardInfo, dotted
from sdtree.errors import InvalidToleranceError, NothingToCompareError
from sdtree.types import PARAMS, PG, is_optim_state_dict

__all__ = ["TensorInfo", "ParamGroupInfo", "Summary", "describe", "Difference", "CheckpointDiff", "diff"]


@attrs.frozen
class TensorInfo:
    """One tensor entry: its key (see :func:`describe`), shape, dtype name and size in bytes.

    ``tied_to`` is the earlier key whose stored tensor this key shares.
    """

    key: str
    shape: tuple[int, ...]
    dtype: str
    nbytes: int
    tied_to: str | None = None


@attrs.frozen
class ParamGroupInfo:
    """One optimizer param group: where it is, how many params, its hyper-parameters."""

    key: str
    params: int
    hyper: Mapping[str, Any]


@attrs.frozen
class Summary:
    """What :func:`describe` found in a checkpoint.

    Attributes:
        tensors: every tensor entry, in order (tied keys included, marked).
        param_groups: the param groups of every optimizer state dict in it.
        values: every other non-tensor entry (flat key, value), param groups aside.
        shards: the shard files of a Hugging Face directory (name, bytes, tensors).
    """

    path: Path
    format: Format
    tensors: tuple[TensorInfo, ...]
    param_groups: tuple[ParamGroupInfo, ...]
    values: tuple[tuple[str, Any], ...]
    shards: tuple[ShardInfo, ...] = ()

    @property
    def stored_bytes(self) -> int:
        """Bytes of tensor data, tied tensors counted once."""
        return sum(t.nbytes for t in self.tensors if t.tied_to is None)

    def by_dtype(self) -> dict[str, tuple[int, int]]:
        """``{dtype: (tensors, bytes)}`` over the stored tensors."""
        out: dict[str, tuple[int, int]] = {}
        for t in self.tensors:
            if t.tied_to is None:
                count, size = out.get(t.dtype, (0, 0))
                out[t.dtype] = (count + 1, size + t.nbytes)
        return out

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict (values that JSON cannot hold become their ``repr``)."""
        return {
            "path": str(self.path),
            "format": self.format,
            "tensors": [
                {"key": t.key, "shape": list(t.shape), "dtype": t.dtype, "bytes": t.nbytes, "tied_to": t.tied_to}
                for t in self.tensors
            ],
            "totals": {
                "tensors": len(self.tensors),
                "stored_tensors": sum(t.tied_to is None for t in self.tensors),
                "bytes": self.stored_bytes,
                "by_dtype": {d: {"tensors": n, "bytes": b} for d, (n, b) in self.by_dtype().items()},
            },
            "param_groups": [
                {"key": g.key, "params": g.params, "hyper": {k: _jsonable(v) for k, v in g.hyper.items()}}
                for g in self.param_groups
            ],
            "values": {key: _jsonable(value) for key, value in self.values},
            "shards": [{"name": s.name, "bytes": s.nbytes, "tensors": s.tensors} for s in self.shards],
        }


def _jsonable(value: Any) -> Any:
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else repr(value)
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    return repr(value)


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``"bfloat16"``."""
    return str(dtype).removeprefix("torch.")


def _param_groups(tree: Any, path: tuple[Any, ...] = ()) -> Iterator[tuple[tuple[Any, ...], Mapping[str, Any]]]:
    """The path and value of each param group of each optimizer state dict in ``tree``."""
    if is_optim_state_dict(tree):
        for i, group in enumerate(tree[PG]):
            if isinstance(group, Mapping):
                yield path + (PG, i), group
    elif isinstance(tree, Mapping):
        for key, value in tree.items():
            yield from _param_groups(value, path + (key,))
    elif isinstance(tree, (list, tuple)):
        for i, value in enumerate(tree):
            yield from _param_groups(value, path + (i,))


def _exact(path: tuple[Any, ...]) -> str:
    """A leaf's path written as code, ``['optim']['state'][0]['exp_avg']``: it
    tells an int key from a str key, and ``'a.b'`` from ``a`` then ``b``."""
    return codify(path, root="")


def _names(paths: Iterable[tuple[Any, ...]]) -> dict[str, str]:
    """The key to show for each path (by :func:`_exact`): its flat key
    (``"optim.state.0.exp_avg"``), or, where two different paths share that
    flat key, the path written as code."""
    paths = list(paths)
    sharing: dict[str, set[str]] = {}
    for p in paths:
        sharing.setdefault(dotted(p), set()).add(_exact(p))
    return {_exact(p): dotted(p) if len(sharing[dotted(p)]) == 1 else _exact(p) for p in paths}


def describe(path: PathLike, *, trust_pickle: bool = False) -> Summary:
    """Summarise the checkpoint at ``path`` from its index, reading no tensor data.

    Entries are named by flat key (``"optim.state.w.exp_avg"``), or, where two
    entries share one (``"a.b"`` and ``a`` → ``b``; keys ``0`` and ``'0'``), by
    their paths written as code (``['a.b']``, ``['a']['b']``).

    Raises:
        the errors of :func:`open_checkpoint`.
    """
    checkpoint = open_checkpoint(path, trust_pickle=trust_pickle)
    groups = list(_param_groups(checkpoint.tree))
    in_groups = {p for p, _ in groups}
    tensors: list[TensorInfo] = []
    values: list[tuple[str, Any]] = []
    first: dict[int, str] = {}
    paths, leaves, _ = tree_flatten_with_path(checkpoint.tree)
    names = _names(paths)
    for p, leaf in zip(paths, leaves):
        key = names[_exact(p)]
        if isinstance(leaf, torch.Tensor):
            tied = first.setdefault(id(leaf), key)
            nbytes = leaf.numel() * leaf.element_size()
            tensors.append(TensorInfo(key, tuple(leaf.shape), dtype_name(leaf.dtype), nbytes, None if tied == key else tied))
        elif not any(p[: len(g)] == g for g in in_groups):
            values.append((key, leaf))
    param_groups = tuple(
        ParamGroupInfo(dotted(p), len(g.get(PARAMS, ())), {k: v for k, v in g.items() if k != PARAMS}) for p, g in groups
    )
    return Summary(checkpoint.path, checkpoint.format, tuple(tensors), param_groups, tuple(values), checkpoint.shards)


# -- diff ---------------------------------------------------------------------

DiffKind = Literal["missing", "unexpected", "key", "type", "shape", "dtype", "value"]


@attrs.frozen
class Difference:
    """One difference between checkpoints A and B at ``key`` (named as by :func:`describe`).

    ``kind`` is ``"missing"`` (in A, not in B), ``"unexpected"`` (in B, not
    in A), ``"key"`` (the same flat key reached by different paths: an int
    key in one where the other has a str, ``"a.b"`` in one where the other
    nests ``a`` → ``b``), ``"type"``, ``"shape"``, ``"dtype"`` or ``"value"``.
    """

    kind: DiffKind
    key: str
    detail: str


@attrs.frozen
class CheckpointDiff:
    """What :func:`diff` found; ``equal`` when there is no difference."""

    a: Path
    b: Path
    compared: int
    differences: tuple[Difference, ...]

    @property
    def equal(self) -> bool:
        return not self.differences


def _leaves(checkpoint: Checkpoint) -> dict[str, tuple[tuple[Any, ...], Any]]:
    """Every leaf with its path, by the path written as code (:func:`_exact`)."""
    paths, leaves, _ = tree_flatten_with_path(checkpoint.tree)
    return {_exact(p): (p, leaf) for p, leaf in zip(paths, leaves)}


def diff(a: PathLike, b: PathLike, *, rtol: float = 0.0, atol: float = 0.0, trust_pickle: bool = False) -> CheckpointDiff:
    """Compare two checkpoints (of any formats) key by key, one tensor pair at a time.

    Entries are paired by their paths, key types included: a DCP checkpoint
    and a ``torch.save`` file of the same state dict compare equal, but
    optimizer state keyed by ``0`` in one and ``'0'`` in the other (which
    loads into no parameter), or a key ``"a.b"`` in one where the other nests
    ``a`` → ``b``, is a ``"key"`` difference (and their values are compared
    too). Tensors must agree in shape and dtype, and in value within ``rtol``
    and ``atol`` (exact by default; NaN equals NaN); other values must be equal.

    Raises:
        InvalidToleranceError: ``rtol`` or ``atol`` is negative, infinite or NaN.
        NothingToCompareError: neither checkpoint holds an entry.
        the errors of :func:`open_checkpoint`.
    """
    for name, tolerance in (("rtol", rtol), ("atol", atol)):
        if not 0 <= tolerance < math.inf:  # NaN fails both
            raise InvalidToleranceError(f"diff: {name} (--{name}) must be a finite number >= 0 (0: exact), not {tolerance!r}.")
    left = open_checkpoint(a, trust_pickle=trust_pickle)
    right = open_checkpoint(b, trust_pickle=trust_pickle)
    la, lb = _leaves(left), _leaves(right)
    names = _names([p for p, _ in la.values()] + [p for p, _ in lb.values()])
    pairs = [(k, k, names[k]) for k in la if k in lb]
    unpaired: dict[str, tuple[list[str], list[str]]] = {}
    for k, (p, _) in la.items():
        if k not in lb:
            unpaired.setdefault(dotted(p), ([], []))[0].append(k)
    for k, (p, _) in lb.items():
        if k not in la:
            unpaired.setdefault(dotted(p), ([], []))[1].append(k)
    found: list[Difference] = []
    for flat, (in_a, in_b) in unpaired.items():
        if len(in_a) == len(in_b) == 1:  # one entry, its keys written differently
            found.append(Difference("key", flat, _key_difference(la[in_a[0]][0], lb[in_b[0]][0])))
            pairs.append((in_a[0], in_b[0], flat))
        else:
            found += [Difference("missing", names[k], "in A, not in B") for k in in_a]
            found += [Difference("unexpected", names[k], "in B, not in A") for k in in_b]
    found.sort(key=lambda d: ("missing", "unexpected", "key").index(d.kind))
    if not la and not lb:
        raise NothingToCompareError(
            f"diff: neither {str(left.path)!r} nor {str(right.path)!r} holds an entry, so nothing was compared: "
            "they are empty, not equal. Check that these are the checkpoints you meant (`sdtree inspect` lists them)."
        )
    for ka, kb, name in pairs:
        problem = _leaf_difference(left, right, la[ka][1], lb[kb][1], rtol, atol)
        if problem is not None:
            found.append(Difference(problem[0], name, problem[1]))
    return CheckpointDiff(left.path, right.path, len(pairs), tuple(found))


def _key_difference(pa: tuple[Any, ...], pb: tuple[Any, ...]) -> str:
    detail = f"A has {_exact(pa)}, B has {_exact(pb)}"
    for x, y in zip(pa, pb):
        if type(x) is not type(y):
            return f"{detail}: key {x!r} ({type(x).__name__}) vs {y!r} ({type(y).__name__})"
    return detail


def _leaf_difference(
    left: Checkpoint, right: Checkpoint, x: Any, y: Any, rtol: float, atol: float
) -> tuple[DiffKind, str] | None:
    if isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor):
        if x.shape != y.shape:
            return "shape", f"{list(x.shape)} vs {list(y.shape)}"
        if x.dtype != y.dtype:
            return "dtype", f"{dtype_name(x.dtype)} vs {dtype_name(y.dtype)}"
        detail = _tensor_difference(left.fetch(x), right.fetch(y), rtol, atol)
        return None if detail is None else ("value", detail)
    if isinstance(x, torch.Tensor) or isinstance(y, torch.Tensor) or not _comparable(x, y):
        return "type", f"{_kind(x)} vs {_kind(y)}"
    if x == y or (isinstance(x, float) and math.isnan(x) and math.isnan(y)):
        return None
    return "value", f"{x!r} vs {y!r}"


def _kind(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"tensor {list(value.shape)} {dtype_name(value.dtype)}"
    return f"{type(value).__name__} {value!r}"


def _comparable(x: Any, y: Any) -> bool:
    numbers = (int, float)
    both_numbers = isinstance(x, numbers) and isinstance(y, numbers) and not isinstance(x, bool) and not isinstance(y, bool)
    return type(x) is type(y) or both_numbers


def _tensor_difference(x: torch.Tensor, y: torch.Tensor, rtol: float, atol: float) -> str | None:
    if x.is_floating_point() and x.element_size() <= 2:
        x, y = x.float(), y.float()
    if x.is_floating_point() or x.is_complex():
        close = torch.isclose(x, y, rtol=rtol, atol=atol, equal_nan=True)
    elif rtol == 0 and atol == 0 or x.dtype == torch.bool:
        close = x == y
    else:
        close = torch.isclose(x.double(), y.double(), rtol=rtol, atol=atol)
    if bool(close.all()):
        return None
    bad = ~close
    count = int(bad.sum())
    index = tuple(int(i) for i in bad.nonzero()[0]) if x.dim() else ()
    detail = f"{count} of {x.numel()} element(s) differ; first at index {list(index)}: {x[index].item()!r} vs {y[index].item()!r}"
    if x.dtype != torch.bool:
        gap = (x.to(torch.complex128 if x.is_complex() else torch.float64) - y.to(torch.complex128 if y.is_complex() else torch.float64)).abs()
        detail += f"; max |A-B| = {float(gap[bad].max()):.6g}"
    return detail
