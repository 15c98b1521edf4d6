"""safetensors files: open lazily, write one tensor at a time.

A safetensors file is an 8-byte little-endian header size, a JSON header
(``{key: {"dtype", "shape", "data_offsets"}, "__metadata__": {str: str}}``)
and the tensors' raw bytes; it holds a flat ``{key: tensor}`` model state
dict and nothing else.

Reading goes through ``safetensors.safe_open``: it checks the header in Rust
(its size against the file's, its JSON, dtypes, shapes, and data offsets
that tile the data exactly) and maps the file, so each tensor is read when it
is fetched. sdtree reads the header again itself only for what ``safe_open``
does not check or tell: duplicate keys (``safe_open`` keeps the last), the
order of the tensors in the file, and its own alias metadata.

Writing is done here, without the ``safetensors`` package's all-at-once API:
the header is written first (the sizes are known from shapes and dtypes),
then each tensor's bytes as it is fetched.

Tied tensors (keys holding the same view of the same memory) are stored once.
The other keys are recorded in the metadata entry ``"sdtree.aliases"``: a JSON
list of ``[position, alias, stored key]``, so loading restores them, in their
place in the key order, as the same tensor object. Other readers see only the
stored keys, as with checkpoints that drop tied weights.
"""

from __future__ import annotations

import collections
import ctypes
import functools
import json
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from safetensors import safe_open

from sdtree.checkpoint._atomic import start_writeback
from sdtree.checkpoint._lazy import Checkpoint, Fetch, fetched_plain, first_aliases, not_flat_model
from sdtree.checkpoint._mapped import FileIdentity, identity_of, map_bytes
from sdtree.checkpoint._spans import FileSpan, pieces_of, write_pieces
from sdtree.errors import CheckpointFormatError, CorruptCheckpointError

__all__ = ["open_safetensors", "write_safetensors", "check_model_state_dict", "with_aliases", "loads_unique", "ALIASES_KEY"]

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
    """Open a safetensors file: its header now, each tensor on demand.

    Raises:
        CorruptCheckpointError: the file is truncated, or its header is
            malformed or inconsistent with its data.
        CheckpointFormatError: it holds a dtype sdtree does not read.
    """
    what = f"safetensors file {str(path)!r}"
    try:
        file: Any = safe_open(str(path), framework="pt")
    except Exception as err:  # safetensors raises its own SafetensorError, or an OSError
        raise CorruptCheckpointError(f"{what} is truncated or corrupt: {err}.") from None
    header, data_start = _read_header(path, what)
    identity = identity_of(os.stat(path))
    header.pop(_METADATA, None)
    tree: dict[str, torch.Tensor] = {}
    readers: dict[int, Callable[[], torch.Tensor]] = {}
    borrowers: dict[int, Callable[[], torch.Tensor]] = {}
    spans: dict[int, Callable[[], Optional[FileSpan]]] = {}
    for key, entry in sorted(header.items(), key=lambda item: tuple(item[1]["data_offsets"])):
        if entry["dtype"] not in _DTYPES:
            raise CheckpointFormatError(
                f"{what}: {key!r} has dtype {entry['dtype']!r}, which sdtree does not read "
                f"(it reads {', '.join(sorted(_DTYPES))})."
            )
        placeholder = torch.empty(entry["shape"], dtype=_DTYPES[entry["dtype"]], device="meta")
        tree[key] = placeholder
        readers[id(placeholder)] = functools.partial(_get_tensor, file, key, what)
        begin = data_start + entry["data_offsets"][0]
        borrowers[id(placeholder)] = functools.partial(_mapped_tensor, path, begin, placeholder, identity, f"{what}: {key!r}")
        nbytes = placeholder.numel() * placeholder.element_size()
        if nbytes and sys.byteorder == "little":  # safetensors stores little-endian
            spans[id(placeholder)] = functools.partial(FileSpan, str(path), begin, nbytes, None, identity, f"{what}: {key!r}")
    tree = _with_aliases(tree, file.metadata() or {}, what)
    return Checkpoint(path, "safetensors", tree, readers=readers, borrowers=borrowers, mapped=frozenset(borrowers), spans=spans)


def _mapped_tensor(path: Path, offset: int, leaf: torch.Tensor, identity: FileIdentity, what: str) -> torch.Tensor:
    """The tensor ``leaf`` stands for, over the file's bytes at ``offset``
    (``safe_open`` has checked they are inside the file)."""
    if leaf.numel() == 0:
        return torch.empty(leaf.shape, dtype=leaf.dtype)
    data = map_bytes(path, offset, leaf.numel() * leaf.element_size(), what, identity=identity)
    return data.view(leaf.dtype).view(leaf.shape)


def _get_tensor(file: Any, key: str, what: str) -> torch.Tensor:
    """The tensor ``key``, in memory of its own: ``get_tensor`` gives a view of
    one copy-on-write map per open file, so two fetches would share memory (a
    write into one would show in the next) and a file truncated meanwhile
    would crash the reader (SIGBUS)."""
    try:
        return file.get_tensor(key).clone()  # type: ignore[no-any-return]
    except Exception as err:  # as in open_safetensors
        raise CorruptCheckpointError(f"{what}: {key!r} cannot be read: {err}.") from None


def _read_header(path: Path, what: str) -> tuple[dict[str, Any], int]:
    """The header (which ``safe_open`` has checked) as JSON, refusing a key
    that appears twice in one object (other readers may take either), and
    where the tensors' bytes start in the file."""
    with open(path, "rb") as file:
        size = int.from_bytes(file.read(8), "little")
        raw = file.read(size)

    header: dict[str, Any] = loads_unique(raw, lambda key: f"{what} is corrupt: its header holds the key {key!r} twice.")
    return header, 8 + size


def loads_unique(raw: bytes, twice: Callable[[str], str]) -> Any:
    """``json.loads``, refusing a key given twice in one object (readers
    differ in which they take); ``twice(key)`` is the error's message.

    Raises:
        CorruptCheckpointError: a key is given twice.
    """

    def unique(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        out = dict(pairs)
        if len(out) != len(pairs):
            key = next(key for key, n in collections.Counter(key for key, _ in pairs).items() if n > 1)
            raise CorruptCheckpointError(twice(key))
        return out

    return json.loads(raw, object_pairs_hook=unique)


def _with_aliases(tree: dict[str, torch.Tensor], metadata: Mapping[str, str], what: str) -> dict[str, torch.Tensor]:
    """Put back the aliases recorded in the file's metadata."""
    if ALIASES_KEY not in metadata:
        return tree
    try:
        recorded = json.loads(metadata[ALIASES_KEY])
    except (TypeError, ValueError):
        recorded = None
    return with_aliases(tree, recorded, what, where="its metadata entry")


def with_aliases(tree: dict[str, torch.Tensor], recorded: Any, what: str, *, where: str) -> dict[str, torch.Tensor]:
    """Put each recorded alias (``[position, alias, stored key]``) back at
    its position, as the tensor it aliases; ``where`` says where they were
    recorded, for errors.

    Raises:
        CorruptCheckpointError: ``recorded`` is not such a list, or an alias
            names a stored key, is given twice, aliases no stored key, or
            shares its position.
    """
    try:
        aliases = sorted((pos, alias, target) for pos, alias, target in recorded)
    except (TypeError, ValueError):
        aliases = [(-1, "", "")]
    total = len(tree) + len(aliases)
    if not all(type(pos) is int and 0 <= pos < total and type(a) is str and type(t) is str for pos, a, t in aliases):
        raise CorruptCheckpointError(
            f"{what} is corrupt: {where} {ALIASES_KEY!r} is not a JSON list of "
            f"[position, alias, stored key], positions below {total}."
        )
    items = list(tree.items())
    names = collections.Counter(alias for _, alias, _ in aliases)
    positions = collections.Counter(pos for pos, _, _ in aliases)
    for pos, alias, target in aliases:
        problem = (
            "names a key that is stored too" if alias in tree
            else "is given twice" if names[alias] > 1
            else "names no stored key (a missing key, or another alias)" if target not in tree
            else "shares its position with another" if positions[pos] > 1
            else None
        )
        if problem is not None:
            raise CorruptCheckpointError(f"{what} is corrupt: alias {alias!r} -> {target!r} in {ALIASES_KEY!r} {problem}.")
        items.insert(pos, (alias, tree[target]))
    return dict(items)


# -- writing ------------------------------------------------------------------


def check_model_state_dict(tree: Any, fn: str, holder: str = "a safetensors file") -> Mapping[str, torch.Tensor]:
    """``tree`` if it is a flat ``{str: tensor}`` mapping safetensors can hold; else raise.

    ``holder`` names what is written, for errors.
    """
    problem = not_flat_model(tree)
    if problem is not None:
        raise CheckpointFormatError(
            f"{fn}: {holder} holds a flat {{str: tensor}} model state dict only, but "
            f"{problem}. Drop or convert such entries first (drop_keys(...)), or save as "
            "'torch' or 'dcp', which hold any state dict."
        )
    model: Mapping[str, torch.Tensor] = tree
    for key, value in model.items():
        if value.dtype not in _CODES:
            raise CheckpointFormatError(
                f"{fn}: {key!r} has dtype {value.dtype}, which safetensors cannot store "
                f"(it stores {', '.join(sorted(str(d) for d in _CODES))}). Save as 'torch' or 'dcp'."
            )
    return model


def write_safetensors(path: Path, tree: Any, fetch: Fetch, *, fn: str, sync: bool = False) -> None:
    """Write a flat ``{key: tensor}`` state dict as safetensors, one tensor at
    a time; with ``sync`` (an fsync will follow), each tensor's writeback
    starts as it is written."""
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
            start = file.tell()
            pieces = pieces_of(fetch, leaf)
            if pieces is not None:  # stored as it is written (or fused from such): copied by the kernel
                write_pieces(file, pieces, leaf, crc=False, what=f"{fn}: {key!r}")
            else:
                tensor = fetched_plain(fetch(leaf), leaf, key, fn)
                if tensor.nbytes:
                    file.write((ctypes.c_ubyte * tensor.nbytes).from_address(tensor.data_ptr()))
                del tensor
            if sync:
                start_writeback(file, start)
