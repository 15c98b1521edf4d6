"""Hugging Face checkpoint directories (format ``"hf"``): safetensors shards and their index.

``save_pretrained`` writes a model state dict as shards
``model-00001-of-00004.safetensors``, ... and an index,
``model.safetensors.index.json``::

    {"metadata": {"total_size": 22848}, "weight_map": {"lm_head.weight": "model-00004-of-00004.safetensors", ...}}

``total_size`` is the bytes of the tensors stored (shard headers aside, tied
tensors once). A model that fits one shard is a single ``model.safetensors``
and no index. Older versions wrote ``torch.save`` files the same way
(``pytorch_model-00001-of-00004.bin`` and ``pytorch_model.bin.index.json``,
or one ``pytorch_model.bin``); sdtree reads those with its weights-only
reader of ``torch.save`` files, and writes safetensors.

Reading checks the index against every shard's header before any tensor data
is read: each key the index lists is in the shard it names, each key a shard
holds is listed, for that shard, and in no other; every shard is there, and
no file named like a shard of this checkpoint is left out of the index;
``total_size`` (when given) is what the shards hold; and the index names
files inside the directory only (a symlink the directory holds is followed,
as in Hugging Face's cache). Each shard is then read as a safetensors (or
``torch.save``) file, with all the checks those readers make.

Writing plans the shards from shapes and dtypes first: tensors in key order,
a shard closed when the next tensor would take it past ``max_shard_size``,
and a tensor larger than that in a shard of its own, as Hugging Face does
(which puts such a tensor first and goes on filling the shard it
interrupted; sdtree keeps the key order, so shards read back in order). Each
shard is then written header first and one tensor at a time, then the index.
Tied tensors are stored once, under their first key; Hugging Face drops the
other keys (transformers re-ties them from the model's config when loading),
and sdtree records them in the metadata entry ``"sdtree.aliases"`` (of the
index, or of the single ``model.safetensors``) so its ``load`` restores them
as one tensor.
"""

from __future__ import annotations

import functools
import json
import os
import re
from collections.abc import Mapping
from fractions import Fraction
from pathlib import Path
from typing import Any, Callable, Optional, Union

import torch

from sdtree.checkpoint._formats import HF_LAYOUTS, HfLayout, hf_layout
from sdtree.checkpoint._lazy import Checkpoint, Fetch, ShardInfo, first_aliases, not_flat_model
from sdtree.checkpoint.layout import MODEL_ONLY_FORMATS
from sdtree.checkpoint._safetensors import (
    ALIASES_KEY,
    check_model_state_dict,
    loads_unique,
    open_safetensors,
    with_aliases,
    write_safetensors,
)
from sdtree.checkpoint._shard_files import names_inside, shard_file_size
from sdtree.checkpoint._spans import FileSpan
from sdtree.checkpoint._torch_file import open_torch_file
from sdtree.errors import CheckpointFormatError, CorruptCheckpointError, preview as _preview

__all__ = ["open_hf", "write_hf", "plan_shards", "parse_size", "DEFAULT_MAX_SHARD_SIZE"]

DEFAULT_MAX_SHARD_SIZE = "5GB"
"""The shard size of ``huggingface_hub``'s splitter (10**9-byte gigabytes)."""

_INDEX_LIMIT = 1 << 28  # an index of 256 MiB would list millions of keys: refused unread
_WRITTEN = HF_LAYOUTS[0]  # sdtree writes safetensors shards


# -- sizes ----------------------------------------------------------------------

_UNITS = {
    "": 1,
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
    "TIB": 2**40,
}
_SIZE = re.compile(r"(\d+(?:\.\d+)?)\s*([A-Za-z]*)")


def parse_size(size: Union[int, str], *, fn: str) -> int:
    """Bytes from a size as Hugging Face writes it: an int, or digits and a unit.

    Units are case-insensitive; ``KB``, ``MB``, ``GB`` and ``TB`` are decimal
    (``"5GB"`` is 5 * 10**9 bytes, as in ``huggingface_hub`` and transformers),
    ``KiB``, ``MiB``, ``GiB`` and ``TiB`` binary.

    >>> parse_size("500MB", fn="save"), parse_size("2GiB", fn="save"), parse_size("1.5kb", fn="save"), parse_size(64, fn="save")
    (500000000, 2147483648, 1500, 64)

    Raises:
        CheckpointFormatError: not such a size, or not at least one byte.
    """
    match = _SIZE.fullmatch(size.strip()) if isinstance(size, str) else None
    if match is not None and match.group(2).upper() in _UNITS:
        nbytes = int(Fraction(match.group(1)) * _UNITS[match.group(2).upper()])
    elif isinstance(size, int) and not isinstance(size, bool):
        nbytes = size
    else:
        nbytes = -1
    if nbytes < 1:
        raise CheckpointFormatError(
            f"{fn}: max_shard_size={size!r} (--max-shard-size) is not a size of at least one byte: give "
            "a number of bytes, or digits and a unit as Hugging Face writes them: '500MB' or '5GB' "
            "(decimal: 1 GB = 10**9 bytes), '2GiB' (binary: 2**30 bytes)."
        )
    return nbytes


# -- reading ----------------------------------------------------------------------


def open_hf(path: Path, *, trust_pickle: bool) -> Checkpoint:
    """Open a Hugging Face directory: its index and every shard's header now,
    each tensor on demand.

    Raises:
        CorruptCheckpointError: the index is malformed or disagrees with the
            shards, a shard is missing or corrupt, or the index names a file
            outside the directory.
        CheckpointFormatError: a shard holds what sdtree does not read.
    """
    layout = hf_layout(path)
    if layout is None:  # detect_format said "hf"; the directory changed since
        raise CorruptCheckpointError(f"Hugging Face checkpoint {str(path)!r} has lost its index.")
    what = f"Hugging Face checkpoint {str(path)!r}"
    index = path / layout.index
    weight_map, metadata = _read_index(index, what, layout.index) if os.path.lexists(index) else (None, {})
    names = sorted(set(weight_map.values())) if weight_map is not None else [layout.single]
    _check_no_strays(path, layout, names, what)
    shards = [_open_shard(path, name, layout, weight_map, what, trust_pickle) for name in names]
    if weight_map is not None:
        _check_against_index(shards, weight_map, layout.index, what)
    tree: dict[str, torch.Tensor] = {}
    readers: dict[int, Callable[[], torch.Tensor]] = {}
    borrowers: dict[int, Callable[[], torch.Tensor]] = {}
    mapped: set[int] = set()
    spans: dict[int, Callable[[], Optional[FileSpan]]] = {}
    for _, shard in shards:
        for key, leaf in shard.tree.items():
            tree[key] = leaf
            if shard.is_placeholder(leaf):
                readers[id(leaf)] = functools.partial(shard.fetch, leaf)
                borrowers[id(leaf)] = functools.partial(shard.borrow, leaf)
                spans[id(leaf)] = functools.partial(shard.span, leaf)
                if shard.is_mapped(leaf):
                    mapped.add(id(leaf))
    if weight_map is not None:
        _check_total_size(metadata, tree, layout.index, what)
        if ALIASES_KEY in metadata:
            tree = with_aliases(tree, metadata[ALIASES_KEY], what, where=f"{layout.index}'s metadata entry")
    infos = tuple(
        ShardInfo(name, (path / name).stat().st_size, len({id(leaf) for leaf in shard.tree.values()})) for name, shard in shards
    )
    return Checkpoint(
        path, "hf", tree, readers=readers, shards=infos, borrowers=borrowers, mapped=frozenset(mapped), spans=spans
    )


def _read_index(index: Path, what: str, name: str) -> tuple[dict[str, str], dict[str, Any]]:
    """The index's ``weight_map`` and ``metadata``, checked: JSON without a
    key given twice, string values that name files inside the directory."""
    size = shard_file_size(index, what, kind="index file")
    if size < 0:
        raise CorruptCheckpointError(f"{what}: {name} is a symlink to nothing ({os.readlink(index)!r}).")
    if size > _INDEX_LIMIT:
        raise CorruptCheckpointError(f"{what}: {name} is {size} bytes, more than any index needs ({_INDEX_LIMIT}); it is not an index.")
    try:
        parsed = loads_unique(index.read_bytes(), lambda key: f"{what}: {name} is corrupt: it gives the key {key!r} twice.")
    except CorruptCheckpointError:
        raise
    except (ValueError, RecursionError) as err:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise CorruptCheckpointError(f"{what}: {name} is not a JSON index: {err}.") from None
    weight_map = parsed.get("weight_map") if isinstance(parsed, dict) else None
    metadata = parsed.get("metadata", {}) if isinstance(parsed, dict) else None
    if not isinstance(weight_map, dict) or not isinstance(metadata, dict):
        raise CorruptCheckpointError(
            f"{what}: {name} is not an index: expected a JSON object "
            '{"metadata": {"total_size": ...}, "weight_map": {key: shard file}}, '
            f"got {_shape_of(parsed)}."
        )
    if not weight_map:
        raise CorruptCheckpointError(f"{what}: {name} lists no tensor (its weight_map is empty).")
    for key, shard in weight_map.items():
        if not isinstance(shard, str):
            raise CorruptCheckpointError(f"{what}: {name} maps {key!r} to {shard!r}, not to the name of a shard file.")
        if not names_inside(shard):
            raise CorruptCheckpointError(
                f"{what}: {name} maps {key!r} to the file {shard!r}, which is not a file inside the "
                "checkpoint directory; sdtree reads only files inside it (a '..' or an absolute path "
                "could read any file on this machine)."
            )
    return weight_map, metadata


def _shape_of(parsed: Any) -> str:
    if isinstance(parsed, dict):
        return f"an object with keys {_preview(parsed)}" if parsed else "an empty object"
    return f"a JSON {type(parsed).__name__}"


def _check_no_strays(path: Path, layout: HfLayout, names: list[str], what: str) -> None:
    """No file in ``path`` is named like a shard of this checkpoint unless it is one."""
    listed = set(names)
    strays = sorted(name for name in os.listdir(path) if layout.shard.fullmatch(name) and name not in listed)
    if strays:
        by = f"{layout.index} does not list" if os.path.lexists(path / layout.index) else f"the directory holds {layout.single!r}, not an index; it does not use"
        raise CorruptCheckpointError(
            f"{what}: {_preview(strays)} {'is' if len(strays) == 1 else 'are'} named like a shard of this "
            f"checkpoint, but {by} {'it' if len(strays) == 1 else 'them'} (left from another save?). "
            "Remove the stray shards, or restore the index that lists them."
        )


def _open_shard(
    path: Path, name: str, layout: HfLayout, weight_map: Optional[Mapping[str, str]], what: str, trust_pickle: bool
) -> tuple[str, Checkpoint]:
    """Open one shard (its header; a tensor is read when fetched)."""
    file = path / name
    if shard_file_size(file, what) < 0:
        keys = [key for key, shard in (weight_map or {}).items() if shard == name]
        raise CorruptCheckpointError(
            f"{what}: the shard {name!r}, which {layout.index} names for {_preview(keys)}"
            f"{f' ({len(keys)} keys)' if len(keys) > 1 else ''}, is missing. Copy every shard the index lists."
        )
    shard = open_safetensors(file) if layout.kind == "safetensors" else open_torch_file(file, trust_pickle=trust_pickle)
    problem = not_flat_model(shard.tree)
    if problem is not None:
        raise CheckpointFormatError(
            f"{what}: the shard {name!r} is not a flat {{str: tensor}} model state dict ({problem}), "
            "which a Hugging Face checkpoint holds. Read the file itself as a torch.save file."
        )
    return name, shard


def _check_against_index(shards: list[tuple[str, Checkpoint]], weight_map: Mapping[str, str], index: str, what: str) -> None:
    """Every key listed is in the shard the index names and only there, and
    every key a shard holds is listed."""
    holders: dict[str, list[str]] = {}
    for name, shard in shards:
        for key in shard.tree:
            holders.setdefault(key, []).append(name)
    for key, name in weight_map.items():
        if name not in holders.get(key, ()):
            elsewhere = holders.get(key)
            found = f"; it is in {_preview(elsewhere)}" if elsewhere else ""
            raise CorruptCheckpointError(
                f"{what}: {index} maps {key!r} to the shard {name!r}, which does not hold it{found}. "
                "The index and the shards are from different saves: copy them together."
            )
    for key, names in holders.items():
        if len(names) > 1:
            raise CorruptCheckpointError(
                f"{what}: {key!r} is stored in two shards, {names[0]!r} and {names[1]!r} (the index "
                f"names {weight_map[key]!r}); a reader could take either. Remove the stale shard."
            )
        if key not in weight_map:
            raise CorruptCheckpointError(
                f"{what}: the shard {names[0]!r} holds {key!r}, which {index} does not list (a stray "
                "tensor, or the shard is from another save). Copy the index and shards together."
            )


def _check_total_size(metadata: Mapping[str, Any], tree: Mapping[str, torch.Tensor], index: str, what: str) -> None:
    """``total_size``, when given, is the bytes the shards hold: tied tensors
    counted once (as Hugging Face counts), or per key (as some writers do)."""
    if "total_size" not in metadata:
        return
    total = metadata["total_size"]
    stored = sum(t.numel() * t.element_size() for t in {id(t): t for t in tree.values()}.values())
    per_key = sum(t.numel() * t.element_size() for t in tree.values())
    if type(total) is not int or total not in (stored, per_key):
        raise CorruptCheckpointError(
            f"{what}: {index} gives total_size={total!r}, but its shards hold {stored} bytes of "
            "tensors. The index and the shards are from different saves, or a shard was changed."
        )


# -- writing ----------------------------------------------------------------------


def plan_shards(sizes: list[tuple[str, int]], max_shard_size: int) -> list[list[str]]:
    """The keys of each shard: ``(key, bytes)`` in order, a shard closed when
    the next tensor would take it past ``max_shard_size``; a larger tensor
    gets a shard of its own.

    >>> plan_shards([("a", 4), ("b", 4), ("c", 4), ("big", 20), ("d", 1)], 10)
    [['a', 'b'], ['c'], ['big'], ['d']]
    """
    shards: list[list[str]] = []
    current: list[str] = []
    used = 0
    for key, size in sizes:
        if current and (used + size > max_shard_size or size > max_shard_size):
            shards.append(current)
            current, used = [], 0
        current.append(key)
        used += size
        if size > max_shard_size:
            shards.append(current)
            current, used = [], 0
    if current or not shards:
        shards.append(current)
    return shards


def write_hf(path: Path, tree: Any, fetch: Fetch, *, fn: str, max_shard_size: int, sync: bool = False) -> None:
    """Write a flat ``{key: tensor}`` state dict into the directory ``path``
    as Hugging Face does: shards of at most ``max_shard_size`` bytes and an
    index, or a single ``model.safetensors``."""
    model = check_model_state_dict(tree, fn, MODEL_ONLY_FORMATS["hf"])
    keys = list(model)
    firsts = first_aliases(list(model.values()))
    stored = [key for i, key in enumerate(keys) if firsts[i] == i]
    shards = plan_shards([(key, model[key].numel() * model[key].element_size()) for key in stored], max_shard_size)
    if len(shards) == 1:  # save_pretrained writes no index then; the aliases go in the file's metadata
        write_safetensors(path / _WRITTEN.single, model, fetch, fn=fn, sync=sync)
        return
    weight_map: dict[str, str] = {}
    for number, shard in enumerate(shards, 1):
        name = f"model-{number:05d}-of-{len(shards):05d}.safetensors"
        write_safetensors(path / name, {key: model[key] for key in shard}, fetch, fn=fn, sync=sync)
        weight_map.update(dict.fromkeys(shard, name))
    metadata: dict[str, Any] = {"total_size": sum(model[key].numel() * model[key].element_size() for key in stored)}
    aliases = [[i, key, keys[firsts[i]]] for i, key in enumerate(keys) if firsts[i] != i]
    if aliases:
        metadata[ALIASES_KEY] = aliases
    text = json.dumps({"metadata": metadata, "weight_map": weight_map}, indent=2, sort_keys=True) + "\n"
    (path / _WRITTEN.index).write_text(text, encoding="utf-8")
