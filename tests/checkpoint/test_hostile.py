"""Hostile checkpoints: each is one sdtree error, in bounded time and memory,
without reading outside the checkpoint or running code from it.

Every case is a small generator ``build(tmp_path) -> source``; the source is
read with ``load``, ``describe`` (which reads no tensor data, so cases whose
fault is in tensor bytes are read by ``load`` and ``convert`` only) and
``convert``, and a sample goes through the command line.
"""

from __future__ import annotations

import collections
import dataclasses
import io
import json
import os
import pickle
import re
import struct
import subprocess
import sys
import time
import zipfile
from pathlib import Path
from typing import Any, Callable

import pytest
import safetensors.torch
import torch
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, MetadataIndex, TensorStorageMetadata

from sdtree.checkpoint import convert, describe, load, save
from sdtree.checkpoint._torch_file import _check_entries
from sdtree.errors import (
    CheckpointFormatError,
    CorruptCheckpointError,
    DestinationError,
    DestinationExistsError,
    UnsafeCheckpointError,
)
from sdtree.testing import assert_state_dict_equal
from tests.cli.test_cli import assert_one_error_line, run

pytestmark = pytest.mark.timeout(60)  # a hang is a failure, not a stuck run

SD = {"a": torch.arange(10, dtype=torch.float32), "b": torch.arange(100, 120)}


# -- safetensors ------------------------------------------------------------------


def _entry(dtype: str, shape: list[Any], offsets: list[Any]) -> dict[str, Any]:
    return {"dtype": dtype, "shape": shape, "data_offsets": offsets}


def _safetensors(header: Any, data: bytes = b"", *, raw: bytes | None = None, length: int | None = None) -> Callable[[Path], Path]:
    def build(tmp: Path) -> Path:
        text = raw if raw is not None else json.dumps(header).encode()
        path = tmp / "m.safetensors"
        path.write_bytes(struct.pack("<Q", len(text) if length is None else length) + text + data)
        return path

    return build


def _aliases(*aliases: list[Any]) -> Callable[[Path], Path]:
    metadata = {"sdtree.aliases": json.dumps(list(aliases))}
    return _safetensors({"__metadata__": metadata, "w": _entry("F32", [2], [0, 8])}, b"\0" * 8)


def _cut_safetensors(tmp: Path) -> Path:
    save({"weight": torch.ones(3)}, tmp / "m.safetensors")
    (tmp / "m.safetensors").write_bytes((tmp / "m.safetensors").read_bytes()[:20])
    return tmp / "m.safetensors"


ST = r"safetensors file '.*m\.safetensors' is truncated or corrupt: Error while deserializing header"
W8 = b"\0" * 8

SAFETENSORS = {
    "header length beyond the file": (_safetensors({"w": _entry("F32", [2], [0, 8])}, W8, length=4096), CorruptCheckpointError, ST),
    "header length absurd": (_safetensors({}, length=2**63), CorruptCheckpointError, ST),
    "truncated inside its header": (_cut_safetensors, CorruptCheckpointError, ST),
    "header a JSON array": (_safetensors(None, raw=b"[1, 2]"), CheckpointFormatError, r"m\.safetensors' is not a checkpoint sdtree knows"),
    "header entry not an object": (_safetensors(None, raw=b'{"w": [1, 2]}'), CorruptCheckpointError, ST),
    "header not JSON": (_safetensors(None, raw=b'{"w": oops}'), CorruptCheckpointError, ST),
    "duplicate keys": (
        _safetensors(None, W8, raw=b'{"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}, "w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}'),
        CorruptCheckpointError,
        r"m\.safetensors' is corrupt: its header holds the key 'w' twice",
    ),
    "offsets out of range": (_safetensors({"w": _entry("F32", [2], [0, 80])}, W8), CorruptCheckpointError, ST),
    "offsets overlap": (_safetensors({"w": _entry("F32", [2], [0, 8]), "v": _entry("F32", [2], [0, 8])}, W8), CorruptCheckpointError, ST),
    "offsets reversed": (_safetensors({"w": _entry("F32", [2], [8, 0])}, W8), CorruptCheckpointError, ST),
    "offsets leave a gap": (_safetensors({"w": _entry("F32", [2], [0, 8]), "v": _entry("F32", [2], [12, 20])}, b"\0" * 20), CorruptCheckpointError, ST),
    "offsets not dtype x shape": (_safetensors({"w": _entry("F32", [3], [0, 8])}, W8), CorruptCheckpointError, ST),
    "unknown dtype": (_safetensors({"w": _entry("X9", [2], [0, 8])}, W8), CorruptCheckpointError, ST),
    "negative shape": (_safetensors({"w": _entry("F32", [-2], [0, 8])}, W8), CorruptCheckpointError, ST),
    "non-integer shape": (_safetensors({"w": _entry("F32", [1.5], [0, 8])}, W8), CorruptCheckpointError, ST),
    "huge shape": (_safetensors({"w": _entry("F32", [2**62, 2**62], [0, 8])}, W8), CorruptCheckpointError, ST),
    "claims a 2**60-element tensor": (_safetensors({"w": _entry("F32", [2**60], [0, 2**62])}, W8), CorruptCheckpointError, ST),
    "non-string metadata value": (_safetensors({"__metadata__": {"n": 1}, "w": _entry("F32", [2], [0, 8])}, W8), CorruptCheckpointError, ST),
    "alias of a missing key": (_aliases([1, "v", "nope"]), CorruptCheckpointError, r"alias 'v' -> 'nope' in 'sdtree\.aliases' names no stored key"),
    "aliases in a loop": (_aliases([1, "u", "v"], [2, "v", "u"]), CorruptCheckpointError, r"alias 'u' -> 'v' in 'sdtree\.aliases' names no stored key"),
    "alias given twice": (_aliases([1, "v", "w"], [2, "v", "w"]), CorruptCheckpointError, r"alias 'v' -> 'w' in 'sdtree\.aliases' is given twice"),
    "alias of itself": (_aliases([0, "w", "w"]), CorruptCheckpointError, r"alias 'w' -> 'w' in 'sdtree\.aliases' names a key that is stored too"),
    "alias out of place": (_aliases([7, "v", "w"]), CorruptCheckpointError, r"'sdtree\.aliases' is not a JSON list of \[position, alias, stored key\], positions below 2"),
    "dtype sdtree does not read": (_safetensors({"w": _entry("F8_E8M0", [2], [0, 2])}, b"\0\0"), CheckpointFormatError, r"'w' has dtype 'F8_E8M0', which sdtree does not read"),
}


# -- torch.save -------------------------------------------------------------------


def _torch(tmp: Path) -> Path:
    torch.save(SD, tmp / "m.pt")
    return tmp / "m.pt"


def _rezipped(compression: int, mutate: Callable[[str, bytes], bytes | None] = lambda name, data: data) -> Callable[[Path], Path]:
    """The torch.save file of ``SD`` re-zipped by Python's zipfile, each record through ``mutate``."""

    def build(tmp: Path) -> Path:
        src = _torch(tmp)
        with zipfile.ZipFile(src) as zin:
            records = [(info.filename, zin.read(info)) for info in zin.infolist()]
        with zipfile.ZipFile(tmp / "re.pt", "w", compression) as zout:
            for name, data in records:
                changed = mutate(name, data)
                if changed is not None:
                    zout.writestr(name, changed)
        src.unlink()
        return tmp / "re.pt"

    return build


class _Storage:
    def __init__(self, numel: int) -> None:
        self.numel = numel


class _Tensor:
    """Pickles as torch.save pickles a tensor, with any claims."""

    def __init__(self, numel: int, shape: tuple[int, ...], stride: tuple[int, ...], offset: int = 0) -> None:
        self.storage, self.shape, self.stride, self.offset = _Storage(numel), shape, stride, offset

    def __reduce__(self) -> Any:
        args = (self.storage, self.offset, self.shape, self.stride, False, collections.OrderedDict())
        return (torch._utils._rebuild_tensor_v2, args)


class _Pickler(pickle.Pickler):
    def persistent_id(self, obj: Any) -> Any:
        return ("storage", torch.FloatStorage, "0", "cpu", obj.numel) if isinstance(obj, _Storage) else None


def _claiming(tensor: _Tensor) -> Callable[[Path], Path]:
    """A torch.save file whose pickle holds ``tensor`` over the 40-byte record data/0."""

    def pickled(name: str, data: bytes) -> bytes | None:
        if name.endswith("data.pkl"):
            out = io.BytesIO()
            _Pickler(out, protocol=2).dump({"a": tensor})
            return out.getvalue()
        return None if name.endswith("data/1") else data

    return _rezipped(zipfile.ZIP_STORED, pickled)


def _flipped(tmp: Path, sd: Any = SD) -> Path:
    """A data byte changed, the CRC left as it was."""
    torch.save(sd, tmp / "m.pt")
    path = tmp / "m.pt"
    data = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as archive:
        info = next(i for i in archive.infolist() if i.filename.endswith("data/0"))
    name_len, extra_len = struct.unpack("<HH", data[info.header_offset + 26 : info.header_offset + 30])
    data[info.header_offset + 30 + name_len + extra_len] ^= 0xFF
    path.write_bytes(bytes(data))
    return path


def _truncated(tmp: Path) -> Path:
    path = _torch(tmp)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return path


def _legacy(tmp: Path) -> Path:
    torch.save(SD, tmp / "old.pt", _use_new_zipfile_serialization=False)
    return tmp / "old.pt"


def _file(name: str, data: bytes) -> Callable[[Path], Path]:
    def build(tmp: Path) -> Path:
        (tmp / name).write_bytes(data)
        return tmp / name

    return build


def _directory(tmp: Path) -> Path:
    (tmp / "m.pt").mkdir()
    return tmp / "m.pt"


def _fifo(tmp: Path) -> Path:
    os.mkfifo(tmp / "pipe.pt")
    return tmp / "pipe.pt"


TORCH = {
    "truncated": (_truncated, CorruptCheckpointError, r"torch\.save file '.*m\.pt' is corrupt or truncated: it is not a readable zip archive"),
    "missing storage record": (
        _rezipped(zipfile.ZIP_STORED, lambda name, data: None if name.endswith("data/1") else data),
        CorruptCheckpointError,
        r"re\.pt' is corrupt: its pickle references the storage record m/data/1, which the archive lacks",
    ),
    "record shorter than claimed": (
        _rezipped(zipfile.ZIP_STORED, lambda name, data: data[:8] if name.endswith("data/1") else data),
        CorruptCheckpointError,
        r"the storage record m/data/1 holds 8 bytes, but the pickle claims 160 \(torch\.int64\)",
    ),
    "claims a 2**60-element storage": (
        _claiming(_Tensor(2**60, (2**60,), (1,))),
        CorruptCheckpointError,
        r"the storage record m/data/0 holds 40 bytes, but the pickle claims 4611686018427387904",
    ),
    "view beyond its storage": (
        _claiming(_Tensor(10, (100,), (1,))),
        CorruptCheckpointError,
        r"'a' \(\[100\], strides \[1\], offset 0, torch\.float32\) spans more than its storage record's 40 bytes",
    ),
    "negative storage offset": (
        _claiming(_Tensor(10, (2,), (1,), offset=-4)),
        CorruptCheckpointError,
        r"re\.pt' is corrupt: its pickle could not be read \(RuntimeError: Tensor: invalid storage offset -4\)",
    ),
    "legacy non-zip format": (_legacy, CheckpointFormatError, r"old\.pt' is in torch\.save's legacy \(pre-1\.6, non-zip\) format.*trust_pickle=True"),
    "empty": (_file("m.pt", b""), CheckpointFormatError, r"m\.pt' is not a checkpoint sdtree knows: the file is empty"),
    "text": (_file("m.pt", b"hello, world\n"), CheckpointFormatError, r"m\.pt' is not a checkpoint sdtree knows: the file starts with b'hello, w'"),
    "a directory": (_directory, CheckpointFormatError, r"m\.pt' is a directory without a '\.metadata' file"),
    "a named pipe": (_fifo, CheckpointFormatError, r"pipe\.pt' is not a checkpoint: it is a named pipe"),
}

TORCH_DATA = {  # faults in tensor bytes: found when the tensor is read
    "fails its CRC": (_flipped, CorruptCheckpointError, r"m\.pt' is corrupt: its record m/data/0 fails its CRC check"),
}


# -- DCP --------------------------------------------------------------------------


def _dcp(tmp: Path) -> Path:
    save({"w": torch.arange(4096.0), "step": 3}, tmp / "ckpt")
    return tmp / "ckpt"


def _with_metadata(change: Callable[[Any, Path], None]) -> Callable[[Path], Path]:
    """A DCP checkpoint whose ``.metadata`` is unpickled, changed, and pickled back."""

    def build(tmp: Path) -> Path:
        path = _dcp(tmp)
        metadata = pickle.loads((path / ".metadata").read_bytes())
        change(metadata, path)
        (path / ".metadata").write_bytes(pickle.dumps(metadata))
        return path

    return build


def _storage_of(fqn: str, **fields: Any) -> Callable[[Any, Path], None]:
    def change(metadata: Any, path: Path) -> None:
        metadata.storage_data = {
            index: dataclasses.replace(info, **{k: v(info) if callable(v) else v for k, v in fields.items()}) if index.fqn == fqn else info
            for index, info in metadata.storage_data.items()
        }

    return change


def _outside(tmp: Path) -> str:
    """Another checkpoint's shard, outside the one read: its bytes must not leak."""
    save({"w": torch.full((4096,), 7.0), "step": 3}, tmp / "secret")
    return str(tmp / "secret" / "__0_0.distcp")


def _path_to(where: Callable[[Path], str]) -> Callable[[Any, Path], None]:
    def change(metadata: Any, path: Path) -> None:
        target = where(path)
        metadata.storage_data = {index: dataclasses.replace(info, relative_path=target) for index, info in metadata.storage_data.items()}

    return change


def _huge(metadata: Any, path: Path) -> None:
    md = metadata.state_dict_metadata["w"]
    size = torch.Size([2**40])
    metadata.state_dict_metadata["w"] = TensorStorageMetadata(md.properties, size, [ChunkStorageMetadata(torch.Size([0]), size)])


def _chunks(*boxes: tuple[int, int]) -> Callable[[Any, Path], None]:
    def change(metadata: Any, path: Path) -> None:
        md = metadata.state_dict_metadata["w"]
        info = next(v for k, v in metadata.storage_data.items() if k.fqn == "w")
        chunks = [ChunkStorageMetadata(torch.Size([o]), torch.Size([n])) for o, n in boxes]
        metadata.state_dict_metadata["w"] = TensorStorageMetadata(md.properties, md.size, chunks)
        metadata.storage_data = {k: v for k, v in metadata.storage_data.items() if k.fqn != "w"}
        share = info.length // len(chunks)  # disjoint records: the chunks are what is wrong
        for index, chunk in enumerate(chunks):
            metadata.storage_data[MetadataIndex("w", chunk.offsets, index)] = dataclasses.replace(info, offset=info.offset + index * share, length=share)

    return change


def _no_storage(metadata: Any, path: Path) -> None:
    metadata.storage_data = {k: v for k, v in metadata.storage_data.items() if k.fqn != "w"}


def _planner_path(metadata: Any, path: Path) -> None:
    metadata.planner_data = {"w": ("w", 10**12), "step": ("step",)}


def _fifo_shard(metadata: Any, path: Path) -> None:
    (path / "__0_0.distcp").unlink()
    os.mkfifo(path / "__0_0.distcp")


def _flipped_dcp(tmp: Path) -> Path:
    """A data byte of 'w' (16 KiB: read, not mapped) changed in its shard file, the CRC left as it was."""
    path = _dcp(tmp)
    shard = path / "__0_0.distcp"
    data = bytearray(shard.read_bytes())
    at = data.find(torch.arange(4096.0).numpy().tobytes())
    assert at >= 0
    data[at + 8000] ^= 0xFF
    shard.write_bytes(bytes(data))
    return path


def _no_metadata(tmp: Path) -> Path:
    path = _dcp(tmp)
    (path / ".metadata").unlink()
    return path


def _garbled_metadata(tmp: Path) -> Path:
    path = _dcp(tmp)
    (path / ".metadata").write_bytes(b"\x80\x04not a pickle at all")
    return path


def _code_metadata(tmp: Path) -> Path:
    from tests.checkpoint.cases import Payload

    path = _dcp(tmp)
    (path / ".metadata").write_bytes(pickle.dumps(Payload(tmp / "code-ran")))
    return path


OUTSIDE = r"\.metadata names the storage file '{}' for .*, which is not a file inside the checkpoint directory"
DCP = {
    "no .metadata": (_no_metadata, CheckpointFormatError, r"ckpt' is a directory without a '\.metadata' file"),
    "corrupt .metadata": (_garbled_metadata, CorruptCheckpointError, r"\.metadata is corrupt: it could not be unpickled"),
    ".metadata that runs code": (_code_metadata, UnsafeCheckpointError, r"\.metadata was refused: it imports builtins\.exec"),
    "claims a huge tensor": (
        _with_metadata(_huge),
        CorruptCheckpointError,
        r"chunk 0 of 'w' is 4398046511104 bytes \(\[1099511627776\] torch\.float32\), but its record in '__0_0\.distcp' holds \d+",
    ),
    "storage file ../x": (
        _with_metadata(_path_to(lambda path: os.path.relpath(_outside(path.parent), path))),
        CorruptCheckpointError,
        OUTSIDE.format(r"\.\./secret/__0_0\.distcp"),
    ),
    "storage file at an absolute path": (_with_metadata(_path_to(lambda path: _outside(path.parent))), CorruptCheckpointError, OUTSIDE.format(r"/.*/secret/__0_0\.distcp")),
    "storage record missing": (_with_metadata(_no_storage), CorruptCheckpointError, r"\.metadata has no storage entry for chunk 0 of 'w'"),
    "storage record shorter than its chunk": (
        _with_metadata(_storage_of("w", length=lambda info: info.length // 2)),
        CorruptCheckpointError,
        r"chunk 0 of 'w' is 16384 bytes \(\[4096\] torch\.float32\), but its record in '__0_0\.distcp' holds \d+",
    ),
    "storage offset out of bounds": (
        _with_metadata(_storage_of("w", offset=lambda info: info.offset + 10**9)),
        CorruptCheckpointError,
        r"\.metadata places MetadataIndex\(fqn='w'.* at bytes \[\d+, \d+\) of '__0_0\.distcp', past the end of the file",
    ),
    "storage records overlap": (
        _with_metadata(_storage_of("w", offset=0)),
        CorruptCheckpointError,
        r"\.metadata places MetadataIndex\(fqn='(w|step)'.* of '__0_0\.distcp', past the record of MetadataIndex",
    ),
    "chunks overlap": (_with_metadata(_chunks((0, 2048), (1024, 2048))), CorruptCheckpointError, r"the chunks of 'w' cover 4096 of its 4096 elements and overlap"),
    "chunks leave a gap": (_with_metadata(_chunks((0, 1024), (2048, 1024))), CorruptCheckpointError, r"the chunks of 'w' cover 2048 of its 4096 elements \("),
    "chunk outside the shape": (_with_metadata(_chunks((0, 2048), (3000, 2048))), CorruptCheckpointError, r"chunk 1 of 'w' \(offsets \[3000\], sizes \[2048\]\) lies outside its shape \[4096\]"),
    "huge list position in a tree path": (_with_metadata(_planner_path), CorruptCheckpointError, r"\.metadata gives 'w' the tree path \('w', 1000000000000\)"),
    "shard file is a named pipe": (_with_metadata(_fifo_shard), CorruptCheckpointError, r"the shard file '.*__0_0\.distcp' is not a regular file"),
}

# DCP checkpoints whose tensor bytes are bad: only reading the data finds them.
DCP_DATA = {
    "a small tensor fails its CRC": (_flipped_dcp, CorruptCheckpointError, r"ckpt': 'w' is corrupt: its record .*data/0 fails its CRC check"),
}

# -- Hugging Face directories -----------------------------------------------------------

INDEX = "model.safetensors.index.json"
SHARD1, SHARD2 = "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"


def _hf(tmp: Path) -> Path:
    """``SD`` in two shards: 'a' (40 bytes) in the first, 'b' (160 bytes) in the second."""
    save(SD, tmp / "hf", format="hf", max_shard_size=100)
    return tmp / "hf"


def _hf_changed(change: Callable[[Path], None]) -> Callable[[Path], Path]:
    def build(tmp: Path) -> Path:
        path = _hf(tmp)
        change(path)
        return path

    return build


def _index(change: Callable[[dict[str, Any]], Any]) -> Callable[[Path], Path]:
    """The index, loaded, changed in place (or replaced by what ``change`` returns: text), and written back."""

    def edit(path: Path) -> None:
        index = json.loads((path / INDEX).read_text())
        text = change(index)
        (path / INDEX).write_text(text if isinstance(text, str) else json.dumps(index))

    return _hf_changed(edit)


def _shard(name: str, tensors: dict[str, torch.Tensor]) -> Callable[[Path], None]:
    def write(path: Path) -> None:
        safetensors.torch.save_file(tensors, str(path / name), metadata={"format": "pt"})

    return write


def _both(first: Callable[[Path], Any], then: Callable[[Path], Any]) -> Callable[[Path], None]:
    def change(path: Path) -> None:
        first(path)
        then(path)

    return change


def _map(key: str, shard: Any) -> Callable[[dict[str, Any]], None]:
    return lambda index: index["weight_map"].__setitem__(key, shard)


def _outside_hf(path: Path) -> str:
    save({"a": torch.full((10,), 7.0)}, path.parent / "secret", format="hf")
    return str(path.parent / "secret" / "model.safetensors")


def _pointing(where: Callable[[Path], str]) -> Callable[[Path], None]:
    def edit(path: Path) -> None:
        index = json.loads((path / INDEX).read_text())
        index["weight_map"]["a"] = where(path)
        (path / INDEX).write_text(json.dumps(index))

    return edit


def _fifo_at(name: str) -> Callable[[Path], None]:
    def change(path: Path) -> None:
        (path / name).unlink()
        os.mkfifo(path / name)

    return change


def _bin_dir(tree: Any, **save_args: Any) -> Callable[[Path], Path]:
    """A directory holding one ``pytorch_model.bin``, as old versions of transformers wrote it."""

    def build(tmp: Path) -> Path:
        (tmp / "hf").mkdir()
        torch.save(tree, tmp / "hf" / "pytorch_model.bin", **save_args)
        return tmp / "hf"

    return build


def _bin_payload(tmp: Path) -> Path:
    from tests.checkpoint.cases import Payload

    return _bin_dir({"w": torch.ones(2), "x": Payload(tmp / "code-ran")})(tmp)


def _cut(name: str, size: int) -> Callable[[Path], None]:
    return lambda path: (path / name).write_bytes((path / name).read_bytes()[:size])


def _raw_shard(name: str, header: bytes) -> Callable[[Path], None]:
    return lambda path: (path / name).write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 160)


HFC = r"Hugging Face checkpoint '.*hf': "
HF_OUTSIDE = HFC + r"model\.safetensors\.index\.json maps 'a' to the file '{}', which is not a file inside the checkpoint directory"
HF = {
    "hf index not JSON": (_index(lambda index: "{not json"), CorruptCheckpointError, HFC + r"model\.safetensors\.index\.json is not a JSON index: Expecting property name"),
    "hf index a JSON array": (_index(lambda index: "[1, 2]"), CorruptCheckpointError, HFC + r"model\.safetensors\.index\.json is not an index: expected a JSON object .* got a JSON list"),
    "hf index without weight_map": (_index(lambda index: index.pop("weight_map")), CorruptCheckpointError, HFC + r"model\.safetensors\.index\.json is not an index: .* got an object with keys 'metadata'"),
    "hf index with an empty weight_map": (_index(lambda index: index["weight_map"].clear()), CorruptCheckpointError, HFC + r"model\.safetensors\.index\.json lists no tensor \(its weight_map is empty\)"),
    "hf index maps a key to a number": (_index(_map("a", 3)), CorruptCheckpointError, HFC + r"model\.safetensors\.index\.json maps 'a' to 3, not to the name of a shard file"),
    "hf index gives a key twice": (
        _index(lambda index: json.dumps(index)[:-2] + f', "a": "{SHARD1}"}}}}'),
        CorruptCheckpointError,
        HFC + r"model\.safetensors\.index\.json is corrupt: it gives the key 'a' twice",
    ),
    "hf shard ../x": (_hf_changed(_pointing(lambda path: os.path.relpath(_outside_hf(path), path))), CorruptCheckpointError, HF_OUTSIDE.format(r"\.\./secret/model\.safetensors")),
    "hf shard at an absolute path": (_hf_changed(_pointing(_outside_hf)), CorruptCheckpointError, HF_OUTSIDE.format(r"/.*/secret/model\.safetensors")),
    "hf shard missing": (
        _hf_changed(lambda path: (path / SHARD2).unlink()),
        CorruptCheckpointError,
        HFC + r"the shard 'model-00002-of-00002\.safetensors', which model\.safetensors\.index\.json names for 'b', is missing",
    ),
    "hf key missing from its shard": (
        _index(_map("c", SHARD1)),
        CorruptCheckpointError,
        HFC + r"model\.safetensors\.index\.json maps 'c' to the shard 'model-00001-of-00002\.safetensors', which does not hold it\. The index and the shards are from different saves",
    ),
    "hf key in the other shard": (
        _hf_changed(_both(_shard(SHARD1, {"b": SD["b"]}), _shard(SHARD2, {"a": SD["a"]}))),
        CorruptCheckpointError,
        HFC + r"model\.safetensors\.index\.json maps 'a' to the shard 'model-00001-of-00002\.safetensors', which does not hold it; it is in 'model-00002-of-00002\.safetensors'",
    ),
    "hf key in two shards": (
        _hf_changed(_shard(SHARD2, dict(SD))),
        CorruptCheckpointError,
        HFC + r"'a' is stored in two shards, 'model-00001-of-00002\.safetensors' and 'model-00002-of-00002\.safetensors'",
    ),
    "hf shard holds a key the index lacks": (
        _hf_changed(_shard(SHARD2, {"b": SD["b"], "c": torch.ones(1)})),
        CorruptCheckpointError,
        HFC + r"the shard 'model-00002-of-00002\.safetensors' holds 'c', which model\.safetensors\.index\.json does not list",
    ),
    "hf stray shard": (
        _hf_changed(lambda path: (path / "model-00003-of-00003.safetensors").write_bytes((path / SHARD1).read_bytes())),
        CorruptCheckpointError,
        HFC + r"'model-00003-of-00003\.safetensors' is named like a shard of this checkpoint, but model\.safetensors\.index\.json does not list it",
    ),
    "hf stray shard beside a single file": (
        _hf_changed(_both(lambda path: (path / INDEX).unlink(), lambda path: (path / SHARD1).rename(path / "model.safetensors"))),
        CorruptCheckpointError,
        HFC + r"'model-00002-of-00002\.safetensors' is named like a shard of this checkpoint, but the directory holds 'model\.safetensors', not an index",
    ),
    "hf total_size disagrees": (
        _index(lambda index: index["metadata"].__setitem__("total_size", 999)),
        CorruptCheckpointError,
        HFC + r"model\.safetensors\.index\.json gives total_size=999, but its shards hold 200 bytes of tensors",
    ),
    "hf total_size not a number": (_index(lambda index: index["metadata"].__setitem__("total_size", "200")), CorruptCheckpointError, HFC + r"model\.safetensors\.index\.json gives total_size='200', but its shards hold 200 bytes"),
    "hf aliases out of place": (
        _index(lambda index: index["metadata"].__setitem__("sdtree.aliases", [[9, "c", "a"]])),
        CorruptCheckpointError,
        r"Hugging Face checkpoint '.*hf' is corrupt: model\.safetensors\.index\.json's metadata entry 'sdtree\.aliases' is not a JSON list of \[position, alias, stored key\], positions below 3",
    ),
    "hf index and model.safetensors both": (
        _hf_changed(lambda path: save({"a": torch.ones(1)}, path / "model.safetensors")),
        CheckpointFormatError,
        r"'.*hf' holds both 'model\.safetensors\.index\.json' and 'model\.safetensors', two Hugging Face checkpoints .* Remove the stale one",
    ),
    "hf shards without their index": (
        _hf_changed(lambda path: (path / INDEX).unlink()),
        CheckpointFormatError,
        r"'.*hf' is a directory without a '\.metadata' file.* nor a Hugging Face one .* It holds shards named as Hugging Face names them \('model-00001-of-00002\.safetensors', 'model-00002-of-00002\.safetensors'\) but not their index",
    ),
    "hf index a dangling symlink": (
        _hf_changed(_both(lambda path: (path / INDEX).unlink(), lambda path: (path / INDEX).symlink_to("gone.json"))),
        CorruptCheckpointError,
        HFC + r"model\.safetensors\.index\.json is a symlink to nothing \('gone\.json'\)",
    ),
    "hf shard a dangling symlink": (
        _hf_changed(_both(lambda path: (path / SHARD1).unlink(), lambda path: (path / SHARD1).symlink_to("../blobs/gone"))),
        CorruptCheckpointError,
        HFC + r"the shard 'model-00001-of-00002\.safetensors', which model\.safetensors\.index\.json names for 'a', is missing",
    ),
    "hf index a named pipe": (_hf_changed(_fifo_at(INDEX)), CorruptCheckpointError, HFC + r"the index file '.*model\.safetensors\.index\.json' is not a regular file"),
    "hf shard a named pipe": (_hf_changed(_fifo_at(SHARD2)), CorruptCheckpointError, HFC + r"the shard file '.*model-00002-of-00002\.safetensors' is not a regular file"),
    "hf shard truncated": (_hf_changed(_cut(SHARD2, 20)), CorruptCheckpointError, r"safetensors file '.*hf/model-00002-of-00002\.safetensors' is truncated or corrupt"),
    "hf shard with duplicate keys": (
        _hf_changed(_raw_shard(SHARD2, b'{"b": {"dtype": "I64", "shape": [20], "data_offsets": [0, 160]}, "b": {"dtype": "I64", "shape": [20], "data_offsets": [0, 160]}}')),
        CorruptCheckpointError,
        r"model-00002-of-00002\.safetensors' is corrupt: its header holds the key 'b' twice",
    ),
    "hf shard with a dtype sdtree does not read": (
        _hf_changed(_raw_shard(SHARD2, b'{"b": {"dtype": "F8_E8M0", "shape": [160], "data_offsets": [0, 160]}}')),
        CheckpointFormatError,
        r"model-00002-of-00002\.safetensors': 'b' has dtype 'F8_E8M0', which sdtree does not read",
    ),
    "hf .bin that runs code": (_bin_payload, UnsafeCheckpointError, r"pytorch_model\.bin' was refused"),
    "hf .bin holding a non-tensor": (
        _bin_dir({"w": torch.ones(2), "step": 3}),
        CheckpointFormatError,
        HFC + r"the shard 'pytorch_model\.bin' is not a flat \{str: tensor\} model state dict \('step' holds a int\), which a Hugging Face checkpoint holds",
    ),
    "hf .bin in the legacy format": (
        _bin_dir(SD, _use_new_zipfile_serialization=False),
        CheckpointFormatError,
        r"pytorch_model\.bin' is in torch\.save's legacy \(pre-1\.6, non-zip\) format",
    ),
}

CASES = {**SAFETENSORS, **TORCH, **DCP, **HF}


def _convert(path: Path) -> Any:
    return convert(path, path.parent / "out" / "x.pt")


@pytest.mark.parametrize("read", [load, describe, _convert], ids=["load", "describe", "convert"])
@pytest.mark.parametrize("name", list(CASES))
def test_hostile_checkpoint_is_one_sdtree_error(tmp_path, name, read):
    build, error, match = CASES[name]
    source = build(tmp_path)
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(error, match=match):
        read(source)
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written, nothing left
    assert not (tmp_path / "code-ran").exists()


@pytest.mark.parametrize("read", [load, _convert], ids=["load", "convert"])
@pytest.mark.parametrize("name", [*TORCH_DATA, *DCP_DATA])
def test_hostile_tensor_bytes_are_one_sdtree_error(tmp_path, name, read):
    build, error, match = {**TORCH_DATA, **DCP_DATA}[name]
    source = build(tmp_path)
    with pytest.raises(error, match=match):
        read(source)
    assert not (tmp_path / "out").exists()


CLI_SAMPLE = [
    "header length beyond the file",
    "truncated inside its header",
    "duplicate keys",
    "alias of a missing key",
    "truncated",
    "record shorter than claimed",
    "legacy non-zip format",
    "a named pipe",
    "claims a huge tensor",
    "storage file ../x",
    "hf index not JSON",
    "hf shard ../x",
    "hf shard missing",
    "hf key in two shards",
    "hf stray shard",
    "hf total_size disagrees",
]


@pytest.mark.parametrize("command", ["inspect", "convert"])
@pytest.mark.parametrize("name", CLI_SAMPLE)
def test_hostile_checkpoint_exits_2_with_one_line(tmp_path, capsys, name, command):
    build, _, match = CASES[name]
    source = build(tmp_path)
    argv = [command, source] + ([tmp_path / "out.pt"] if command == "convert" else [])
    status, out, err = run(capsys, *argv)
    assert_one_error_line(status, out, err, str(source))
    assert re.search(match, err), err
    assert not (tmp_path / "out.pt").exists()


# -- what torch.load reads, sdtree reads -------------------------------------------


@pytest.mark.parametrize("compression", [zipfile.ZIP_DEFLATED, zipfile.ZIP_STORED], ids=["deflated", "stored"])
def test_a_rezipped_torch_file_reads_back_its_values(tmp_path, compression):
    source = _rezipped(compression)(tmp_path)
    assert_state_dict_equal(torch.load(source, weights_only=True), SD)
    assert_state_dict_equal(load(source), SD)
    convert(source, tmp_path / "out.safetensors")
    assert_state_dict_equal(load(tmp_path / "out.safetensors"), SD)


def test_a_torch_file_written_without_crcs_reads(tmp_path):
    torch.serialization.set_crc32_options(False)  # torch then writes CRC 0, and torch.load reads it
    try:
        torch.save(SD, tmp_path / "m.pt")
    finally:
        torch.serialization.set_crc32_options(True)
    assert_state_dict_equal(load(tmp_path / "m.pt"), SD)


def test_a_file_read_whole_has_its_crcs_checked_too(tmp_path):
    path = _flipped(tmp_path, {"w": torch.arange(4.0), "s": torch.ones(3).to_sparse()})  # sparse: torch.load builds it
    for read in (load, describe):
        with pytest.raises(CorruptCheckpointError, match=r"m\.pt' is corrupt: its record m/data/0 fails its CRC check"):
            read(path)


def test_a_templated_dcp_load_checks_the_metadata_too(tmp_path):
    path = CASES["storage file ../x"][0](tmp_path)
    with pytest.raises(CorruptCheckpointError, match=OUTSIDE.format(r"\.\./secret/__0_0\.distcp")):
        load(path, template={"w": torch.empty(4096)})


def test_a_record_that_claims_more_than_deflate_can_give_is_refused():
    info = zipfile.ZipInfo("archive/data/0")
    info.compress_type, info.compress_size, info.file_size, info.header_offset = zipfile.ZIP_DEFLATED, 100, 2**40, 0
    with pytest.raises(CorruptCheckpointError, match=r"record 'archive/data/0' claims 1099511627776 bytes inflated from 100, more than deflate can give"):
        _check_entries([info], 1000, "torch.save file 'x'")


def test_a_shard_the_directory_links_to_is_followed(tmp_path):
    path = _dcp(tmp_path)
    (tmp_path / "blobs").mkdir()
    (path / "__0_0.distcp").rename(tmp_path / "blobs" / "shard")
    (path / "__0_0.distcp").symlink_to(tmp_path / "blobs" / "shard")
    assert_state_dict_equal(load(path), {"w": torch.arange(4096.0), "step": 3})


# -- destinations ------------------------------------------------------------------


@pytest.mark.parametrize("dst", ["out.pt", "out.safetensors", "out"])
def test_a_destination_that_cannot_be_written_is_one_error(tmp_path, dst):
    source = _torch(tmp_path)
    (tmp_path / "a-file").write_bytes(b"")
    targets = [tmp_path / "a-file" / "sub" / dst]  # a file where a directory should be
    if Path("/proc").is_dir():
        targets.append(Path("/proc") / f"sdtree-test-{os.getpid()}-{dst}")  # not writable, even by root
    for target in targets:
        with pytest.raises(DestinationError, match=rf"convert: cannot write '{re.escape(str(target))}': .*Nothing was written"):
            convert(source, target)
        assert not os.path.lexists(target)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file", "m.pt"]


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root writes into read-only directories: permission bits do not stop it")
def test_a_read_only_directory_is_one_error(tmp_path):
    source = _torch(tmp_path)
    (tmp_path / "ro").mkdir(mode=0o500)
    try:
        with pytest.raises(DestinationError, match=r"convert: cannot write '.*ro/out\.pt': Permission denied"):
            convert(source, tmp_path / "ro" / "out.pt")
    finally:
        (tmp_path / "ro").chmod(0o700)


def test_same_path_as_source_and_destination_is_refused_before_anything_even_with_force(tmp_path, capsys):
    source = _torch(tmp_path)
    original = source.read_bytes()
    (tmp_path / "link.pt").symlink_to(source)
    for dst in (source, tmp_path / "link.pt", tmp_path / "." / "m.pt"):
        with pytest.raises(DestinationError, match=r"convert: the destination '.*' is the source '.*m\.pt'.*even with force=True"):
            convert(source, dst, force=True, to="torch")
    path = _dcp(tmp_path)
    with pytest.raises(DestinationError, match=r"the destination '.*' holds the source '.*ckpt'"):
        convert(path, tmp_path, force=True, to="dcp")
    status, out, err = run(capsys, "convert", source, source, "--force")
    assert_one_error_line(status, out, err, "is the source")
    assert source.read_bytes() == original
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "link.pt", "m.pt"]


def _dead_pid() -> int:
    try:
        return int(Path("/proc/sys/kernel/pid_max").read_text()) + 1
    except OSError:
        return 2**22 + 1


def test_leftovers_of_killed_writes_are_cleaned_by_the_next_write_or_force(tmp_path):
    source = _torch(tmp_path)
    stale = tmp_path / f".out.pt.sdtree-tmp-{_dead_pid()}-0123abcd"
    live = tmp_path / f".out.pt.sdtree-tmp-{os.getpid()}-0123abcd"
    stale.write_bytes(b"half")
    live.write_bytes(b"busy")
    convert(source, tmp_path / "out.pt")
    assert not stale.exists() and live.exists()
    stale.mkdir()  # a DCP directory half-written
    with pytest.raises(DestinationExistsError):
        convert(source, tmp_path / "out.pt")
    assert stale.exists()
    convert(source, tmp_path / "out.pt", force=True)
    assert not stale.exists() and live.exists()
    assert_state_dict_equal(load(tmp_path / "out.pt"), SD)


def test_a_convert_killed_mid_write_leaves_only_a_temporary_that_the_next_run_cleans(tmp_path):
    source = tmp_path / "big.safetensors"
    save({f"t{i}": torch.zeros(1 << 22) for i in range(16)}, source)  # 256 MiB: slow enough to catch
    dst = tmp_path / "out.pt"
    proc = subprocess.Popen(
        [sys.executable, "-m", "sdtree", "convert", str(source), str(dst)],
        cwd=Path(__file__).resolve().parents[2],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 50
        while time.monotonic() < deadline and proc.poll() is None:
            leftovers = [p for p in tmp_path.iterdir() if p.name.startswith(".out.pt.sdtree-tmp-")]
            if leftovers and leftovers[0].stat().st_size > 0:
                break
            time.sleep(0.002)
        proc.kill()
    finally:
        proc.wait()
    assert proc.returncode == -9, "the conversion ended before it could be killed"
    assert not dst.exists()
    leftovers = [p.name for p in tmp_path.iterdir() if p != source]
    assert len(leftovers) == 1 and leftovers[0].startswith(f".out.pt.sdtree-tmp-{proc.pid}-"), leftovers
    convert(source, dst)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.safetensors", "out.pt"]
