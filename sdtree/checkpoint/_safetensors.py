"""safetensors files: open lazily, write one tensor at a time.

A safetensors file is an 8-byte little-endian header size, a JSON header
(``{key: {"dtype", "shape", "data_offsets"}, "__metadata__": {str: str}}``)
and the tensors' raw bytes; it holds a flat ``{key: tensor}`` model state
dict and nothing else. Both directions are done here without the
``safetensors`` package's all-at-once API: the header is written first (the
sizes are known from shapes and dtypes), then each tensor's bytes as it is
fetched; reading parses the header and reads one byte range per tensor.

Tied tensors (keys holding the same view of the same memory) are stored once.
The other keys are recorded in the metadata entry ``"sdtree.aliases"``: a JSON
list of ``[position, alias, stored key]``, so loading restores them, in their
place in the key order, as the same tensor object. Other readers see only the
stored keys, as with checkpoints that drop tied weights.
"""

from __future__ import annotations

import ctypes
import functools
import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Callable

import torch

from sdtree.checkpoint._lazy import (
    Checkpoint,
    Fetch,
    fetched_plain,
    first_aliases,
    read_range,
    tensor_from_bytes,
)
from sdtree.errors import CheckpointFormatError, CorruptCheckpointError
from sdtree.transforms.tensors import contiguous_strides

__all__ = ["open_safetensors", "write_safetensors", "check_model_state_dict", "ALIASES_KEY"]

ALIASES_KEY = "sdtree.aliases"
_METADATA = "__metadata__"
_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U64": torch.uint64,
    "U32": torch.uint32,
    "U16": torch.uint16,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E4M3FNUZ": torch.float8_e4m3fnuz,
    "F8_E5M2": torch.float8_e5m2,
    "F8_E5M2FNUZ": torch.float8_e5m2fnuz,
    "C64": torch.complex64,
}
_CODES = {dtype: code for code, dtype in _DTYPES.items()}


# -- reading ------------------------------------------------------------------


def open_safetensors(path: Path) -> Checkpoint:
    """Open a safetensors file: its header now, each tensor on demand."""
    what = f"safetensors file {str(path)!r}"
    header, data_start, data_size = _read_header(path, what)
    metadata = header.pop(_METADATA, None) or {}
    entries = sorted(((key, _entry(key, value, data_size, what)) for key, value in header.items()), key=lambda e: e[1][2])
    tree: dict[str, torch.Tensor] = {}
    readers: dict[int, Callable[[], torch.Tensor]] = {}
    for key, (dtype, shape, begin, end) in entries:
        placeholder = torch.empty(shape, dtype=dtype, device="meta")
        tree[key] = placeholder
        read = functools.partial(read_range, path, data_start + begin, end - begin, what=what)
        readers[id(placeholder)] = functools.partial(_build, read, dtype, shape)
    return Checkpoint(path, "safetensors", _with_aliases(tree, metadata, what), readers=readers)


def _build(read: Callable[[], torch.Tensor], dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    return tensor_from_bytes(read(), dtype, shape, contiguous_strides(shape))


def _read_header(path: Path, what: str) -> tuple[dict[str, Any], int, int]:
    size = path.stat().st_size
    with open(path, "rb") as file:
        head = file.read(8)
        length = int.from_bytes(head, "little") if len(head) == 8 else -1
        if not 2 <= length <= size - 8:
            raise CorruptCheckpointError(
                f"{what} is corrupt: its first 8 bytes give a header of {length} bytes, but the "
                f"file has {size} bytes."
            )
        raw = file.read(length)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CorruptCheckpointError(f"{what} is corrupt: its header is not JSON ({err}).") from None
    if not isinstance(header, dict):
        raise CorruptCheckpointError(f"{what} is corrupt: its header is a {type(header).__name__}, not an object.")
    return header, 8 + length, size - 8 - length


def _entry(key: str, value: Any, data_size: int, what: str) -> tuple[torch.dtype, tuple[int, ...], int, int]:
    """Validate one header entry; return its dtype, shape and byte range."""
    try:
        dtype = _DTYPES[value["dtype"]]
        shape = tuple(int(n) for n in value["shape"])
        begin, end = (int(n) for n in value["data_offsets"])
    except (KeyError, TypeError, ValueError):
        raise CorruptCheckpointError(
            f"{what} is corrupt: the header entry of {key!r} is {value!r}; expected "
            f"{{'dtype': one of {sorted(_DTYPES)}, 'shape': [...], 'data_offsets': [begin, end]}}."
        ) from None
    nbytes = math.prod(shape) * dtype.itemsize
    if min(shape, default=0) < 0 or not 0 <= begin <= end <= data_size or end - begin != nbytes:
        raise CorruptCheckpointError(
            f"{what} is corrupt: {key!r} ({value['dtype']} {list(shape)}, {nbytes} bytes) has data "
            f"offsets [{begin}, {end}] in a data section of {data_size} bytes (truncated file?)."
        )
    return dtype, shape, begin, end


def _with_aliases(tree: dict[str, torch.Tensor], metadata: Any, what: str) -> dict[str, torch.Tensor]:
    """Put each recorded alias back at its position, as the tensor it aliases."""
    if not isinstance(metadata, dict) or ALIASES_KEY not in metadata:
        return tree
    try:
        aliases = sorted((int(pos), str(alias), str(target)) for pos, alias, target in json.loads(metadata[ALIASES_KEY]))
    except (TypeError, ValueError):
        raise CorruptCheckpointError(
            f"{what} is corrupt: its metadata entry {ALIASES_KEY!r} is not a JSON list of "
            "[position, alias, stored key]."
        ) from None
    items = list(tree.items())
    for pos, alias, target in aliases:
        if target not in tree or alias in tree:
            raise CorruptCheckpointError(
                f"{what} is corrupt: alias {alias!r} -> {target!r} in {ALIASES_KEY!r} names "
                f"{'a key that is stored too' if alias in tree else 'no stored key'}."
            )
        items.insert(pos, (alias, tree[target]))
    return dict(items)


# -- writing ------------------------------------------------------------------


def check_model_state_dict(tree: Any, fn: str) -> Mapping[str, torch.Tensor]:
    """``tree`` if it is a flat ``{str: tensor}`` mapping safetensors can hold; else raise."""
    if not isinstance(tree, Mapping):
        raise CheckpointFormatError(
            f"{fn}: a safetensors file holds a flat {{key: tensor}} model state dict, got a "
            f"{type(tree).__name__}. Save it as 'torch' or 'dcp' instead."
        )
    for key, value in tree.items():
        if type(key) is not str or not isinstance(value, torch.Tensor):
            got = f"key {key!r}" if type(key) is not str else f"{key!r} holds a {type(value).__name__}"
            raise CheckpointFormatError(
                f"{fn}: a safetensors file holds a flat {{str: tensor}} model state dict only, but "
                f"{got}. Drop or convert such entries first (drop_keys(...)), or save as "
                "'torch' or 'dcp', which hold any state dict."
            )
        if value.dtype not in _CODES:
            raise CheckpointFormatError(
                f"{fn}: {key!r} has dtype {value.dtype}, which safetensors cannot store "
                f"(it stores {', '.join(sorted(str(d) for d in _CODES))}). Save as 'torch' or 'dcp'."
            )
    return tree


def write_safetensors(path: Path, tree: Any, fetch: Fetch, *, fn: str) -> None:
    """Write a flat ``{key: tensor}`` state dict as safetensors, one tensor at a time."""
    model = check_model_state_dict(tree, fn)
    entries: dict[str, Any] = {}
    stored: list[tuple[str, torch.Tensor]] = []
    aliases: list[tuple[int, str, str]] = []
    keys = list(model)
    offset = 0
    for position, ((key, leaf), first) in enumerate(zip(model.items(), first_aliases(list(model.values())))):
        if first != position:
            aliases.append((position, key, keys[first]))
            continue
        nbytes = leaf.numel() * leaf.element_size()
        entries[key] = {"dtype": _CODES[leaf.dtype], "shape": list(leaf.shape), "data_offsets": [offset, offset + nbytes]}
        stored.append((key, leaf))
        offset += nbytes
    metadata = {"format": "pt"}
    if aliases:
        metadata[ALIASES_KEY] = json.dumps(aliases)
    header = json.dumps({_METADATA: metadata, **entries}, separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)
    with open(path, "wb") as file:
        file.write(len(header).to_bytes(8, "little"))
        file.write(header)
        for key, leaf in stored:
            tensor = fetched_plain(fetch(leaf), leaf, key, fn)
            if tensor.nbytes:
                file.write((ctypes.c_ubyte * tensor.nbytes).from_address(tensor.data_ptr()))
            del tensor
