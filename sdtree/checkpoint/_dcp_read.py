"""Read ``torch.distributed.checkpoint`` (DCP) directories.

DCP stores leaves only: an empty container that DCP walks into (a mapping,
or a list holding mappings) is not in the checkpoint, so it does not load back
(torch's format; an optimizer's empty ``"state"`` is restored).

``.metadata`` lists every flat key with its shape, dtype and chunks (one per
shard), and where each chunk lies in the ``*.distcp`` files. A tensor is read
on demand, chunk by chunk, into one full tensor: a large chunk stored plainly
is read straight into its slice of that tensor; any other goes through
torch's ``FileSystemReader``. Non-tensor values (hyper-parameters, steps) are
read when the checkpoint is opened. torch reads ``.metadata`` with plain
``pickle.load`` and non-tensor values with ``torch.load(weights_only=False)``;
sdtree reads both without running code from the files (see ``_pickle``).

With a template (DTensors included), ``load_dcp_into`` runs torch's
collective load with those safe readers, so each rank reads its own shards.
"""

from __future__ import annotations

import functools
import io
import math
import reprlib
import sys
import warnings
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any, Callable, Optional, cast

import torch
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.filesystem import FileSystemReader
from torch.distributed.checkpoint.metadata import (
    BytesStorageMetadata,
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    StorageMeta,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.planner import LoadItemType, LoadPlan, LoadPlanner, ReadItem
from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list
from torch.distributed.checkpoint.state_dict_loader import load as dcp_load

from sdtree._collectives import several_ranks
from sdtree._tree import tree_map
from sdtree.checkpoint._formats import DCP_METADATA
from sdtree.checkpoint._lazy import Checkpoint
from sdtree.checkpoint._pickle import LOAD_ERRORS, load_dcp_metadata, load_error, torch_load
from sdtree.checkpoint._shard_files import names_inside, shard_file_size
from sdtree.checkpoint._spans import FileSpan
from sdtree.checkpoint._torch_file import TorchArchive
from sdtree.errors import CorruptCheckpointError, IncompatibleStateDictError, SdtreeError, preview as _preview
from sdtree.types import PG, STATE
from sdtree.transforms.nested import unflatten_state_dict

__all__ = ["open_dcp", "load_dcp_into", "quiet_single_process", "unwrapped_errors"]


# -- reading ------------------------------------------------------------------


class _SafeReader(FileSystemReader):
    """torch's reader, but ``.metadata`` is unpickled without running code,
    and checked (:func:`_check_metadata`) before anything reads by it.

    ``dcp.load`` reports a failure to read metadata only as text; the error
    itself is kept in ``failure``.
    """

    def __init__(self, path: Path, *, trust_pickle: bool) -> None:
        super().__init__(path)
        self.trust_pickle = trust_pickle
        self.failure: Optional[SdtreeError] = None

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        try:
            return self._read_metadata(kwargs.get("rank"))
        except SdtreeError as err:
            self.failure = self.failure or err
            raise

    def _read_metadata(self, rank: Optional[int]) -> Metadata:
        path = self._get_metadata_path(rank)
        what = f"DCP checkpoint {str(self.path)!r}: {DCP_METADATA}"
        with self.fs.create_stream(path, "rb") as file:
            metadata = load_dcp_metadata(cast(IO[bytes], file), what=what, trust_pickle=self.trust_pickle)
        if not isinstance(metadata, Metadata):
            raise CorruptCheckpointError(f"{what} holds a {type(metadata).__name__}, not DCP Metadata.")
        _check_metadata(metadata, Path(self.path), f"DCP checkpoint {str(self.path)!r}")
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id  # type: ignore[union-attr]  # set just above
        return metadata


class _ReadInto(LoadPlanner):
    """Receives what ``FileSystemReader.read_data`` reads: tensor chunks go
    into ``target``, non-tensor values are unpickled safely into ``values``."""

    def __init__(self, target: Optional[torch.Tensor], *, trust_pickle: bool, what: str) -> None:
        self.target = target
        self.values: dict[str, Any] = {}
        self.trust_pickle = trust_pickle
        self.what = what

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        fqn = read_item.dest_index.fqn
        self.values[fqn] = torch_load(value, what=f"{self.what}: {fqn!r}", trust_pickle=self.trust_pickle)

    def resolve_tensor(self, read_item: ReadItem) -> torch.Tensor:
        if self.target is None:
            raise CorruptCheckpointError(f"{self.what}: {read_item.dest_index.fqn!r} holds a tensor where a value was expected.")
        return _narrow(self.target, read_item.dest_offsets, read_item.lengths)

    def commit_tensor(self, read_item: ReadItem, tensor: torch.Tensor) -> None:
        pass

    # The planning steps belong to dcp.load, which this planner is not used with.
    def set_up_planner(self, state_dict: Any, metadata: Optional[Metadata] = None, is_coordinator: bool = False) -> None:
        raise NotImplementedError

    def create_local_plan(self) -> LoadPlan:
        raise NotImplementedError

    def create_global_plan(self, global_plan: list[LoadPlan]) -> list[LoadPlan]:
        raise NotImplementedError

    def finish_plan(self, central_plan: LoadPlan) -> LoadPlan:
        raise NotImplementedError


def _read(reader: FileSystemReader, items: list[ReadItem], planner: _ReadInto, what: str) -> None:
    try:
        reader.read_data(LoadPlan(items), planner).wait()
    except FileNotFoundError as err:
        raise CorruptCheckpointError(
            f"{what}: the shard file {err.filename!r} is missing. Copy the whole checkpoint "
            "directory, every *.distcp file with its .metadata."
        ) from None
    except LOAD_ERRORS as err:
        raise load_error(err, what) from None


def _read_tensor(reader: FileSystemReader, fqn: str, md: TensorStorageMetadata, what: str) -> torch.Tensor:
    """Read every chunk of ``fqn`` into one new full tensor."""
    target = torch.empty(md.size, dtype=md.properties.dtype)
    if not _read_chunks_in_place(reader, fqn, md, target, f"{what}: {fqn!r}"):
        whole = ChunkStorageMetadata(offsets=torch.Size([0] * len(md.size)), sizes=md.size)
        items = create_read_items_for_chunk_list(fqn, md, [whole])
        _read(reader, items, _ReadInto(target, trust_pickle=False, what=what), f"{what}: {fqn!r}")
    return target


# From this size a plain single-chunk tensor is borrowed (mapped from its
# file, see ``_mapped``): below it, a mapping costs more than reading the bytes.
_BORROW_MIN_BYTES = 1 << 20


def _read_chunks_in_place(reader: FileSystemReader, fqn: str, md: TensorStorageMetadata, target: torch.Tensor, what: str) -> bool:
    """Read each chunk's bytes straight into its slice of ``target`` (no copy
    through a temporary tensor); return False, having maybe filled part of
    ``target``, where a chunk is stored in a way this does not handle.

    Every chunk it reads has its CRC checked, which torch's reader (the
    fallback) does not do; so every plain chunk is read here, small ones too
    (measured faster than torch's reader for 2,000 tensors of 4 KiB)."""
    places = []
    for index, chunk in enumerate(md.chunks):
        info = reader.storage_data.get(MetadataIndex(fqn, chunk.offsets, index))
        dest = _narrow(target, chunk.offsets, chunk.sizes)
        if info is None or getattr(info, "transform_descriptors", None) or not dest.is_contiguous():
            return False
        places.append((Path(reader.path) / info.relative_path, info.offset, info.length, dest))
    return all(_read_blob_into(path, offset, length, dest, what) for path, offset, length, dest in places)


def _read_blob_into(path: Path, offset: int, length: int, dest: torch.Tensor, what: str) -> bool:
    """Read the tensor in the ``torch.save`` blob at ``offset`` of ``path``
    into ``dest``; False, reading nothing, unless it is stored plainly (see
    :func:`_plain_record`)."""
    with open(path, "rb") as file:
        found = _plain_record(file, offset, length, dest.shape, dest.dtype, what)
        if found is not None:
            archive, key = found
            archive.read_record_into(key, dest)
        return found is not None


def _plain_record(
    file: io.BufferedReader, offset: int, length: int, shape: torch.Size, dtype: torch.dtype, what: str
) -> Optional[tuple[TorchArchive, str]]:
    """The archive of the ``torch.save`` blob at ``offset`` of ``file`` and
    the key of its record, if it is stored plainly: one tensor of ``shape``
    and ``dtype`` that spans its whole record, in this machine's byte order."""
    archive = TorchArchive.open(_Window(file, offset, length), length, what)
    meta = archive.skeleton(trust_pickle=False)
    record = TorchArchive.record_of(meta) if type(meta) is torch.Tensor else None
    plain = (
        record is not None
        and meta.shape == shape
        and meta.dtype == dtype
        and meta.is_contiguous()
        and meta.storage_offset() == 0
        and record.nbytes == math.prod(shape) * dtype.itemsize
        and archive.byteorder in (None, sys.byteorder)
    )
    return (archive, record.key) if plain and record is not None else None


@contextmanager
def _large_plain_record(
    reader: FileSystemReader, fqn: str, md: TensorStorageMetadata, what: str
) -> Iterator[Optional[tuple[TorchArchive, str, Path, int]]]:
    """``(archive, record key, file, archive's offset in it)`` of ``fqn``
    where it is one plain chunk (see :func:`_plain_record`) of at least
    1 MiB, as borrowing and spans take it, with its file open meanwhile
    (the archive reads through it); else None."""
    info = reader.storage_data.get(MetadataIndex(fqn, md.chunks[0].offsets, 0)) if len(md.chunks) == 1 else None
    if info is None or getattr(info, "transform_descriptors", None) or (
        math.prod(md.size) * md.properties.dtype.itemsize < _BORROW_MIN_BYTES
    ):
        yield None
        return
    path = Path(reader.path) / info.relative_path
    with open(path, "rb") as file:
        found = _plain_record(file, info.offset, info.length, md.size, md.properties.dtype, f"{what}: {fqn!r}")
        yield None if found is None else (found[0], found[1], path, info.offset)


def _borrow_tensor(reader: FileSystemReader, fqn: str, md: TensorStorageMetadata, what: str) -> torch.Tensor:
    """``fqn`` mapped from its ``.distcp`` file where it is one plain chunk
    of at least 1 MiB, its CRC checked (see ``_mapped``); else read."""
    with _large_plain_record(reader, fqn, md, what) as found:
        data = found[0].map_record(found[1], found[2], found[3]) if found is not None else None
    if data is not None:
        return data.view(md.properties.dtype).view(md.size)
    return _read_tensor(reader, fqn, md, what)


def _span_of(reader: FileSystemReader, fqn: str, md: TensorStorageMetadata, what: str) -> Optional[FileSpan]:
    """Where ``fqn``'s bytes lie in its ``.distcp`` file, where it is one
    plain chunk of at least 1 MiB (as :func:`_borrow_tensor` maps it), with
    the CRC its record holds; else None."""
    with _large_plain_record(reader, fqn, md, what) as found:
        return found[0].record_span(found[1], found[2], found[3], f"{what}: {fqn!r}") if found is not None else None


def _narrow(tensor: torch.Tensor, offsets: Sequence[int], sizes: Sequence[int]) -> torch.Tensor:
    for dim, (start, length) in enumerate(zip(offsets, sizes)):
        tensor = tensor.narrow(dim, start, length)
    return tensor


class _Window(io.RawIOBase):
    """A read-only file object over ``length`` bytes at ``offset`` of ``file``."""

    def __init__(self, file: io.BufferedReader, offset: int, length: int) -> None:
        super().__init__()
        self._file, self._offset, self._length, self._pos = file, offset, length, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, pos: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._length}[whence]
        self._pos = max(0, base + pos)
        return self._pos

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        want = max(0, min(len(view), self._length - self._pos))
        self._file.seek(self._offset + self._pos)
        got = self._file.readinto(view[:want]) or 0
        self._pos += got
        return got


def _read_values(reader: FileSystemReader, fqns: list[str], *, trust_pickle: bool, what: str) -> dict[str, Any]:
    planner = _ReadInto(None, trust_pickle=trust_pickle, what=what)
    items = [
        ReadItem(
            type=LoadItemType.BYTE_IO,
            dest_index=MetadataIndex(fqn),
            dest_offsets=torch.Size((0,)),
            storage_index=MetadataIndex(fqn),
            storage_offsets=torch.Size((0,)),
            lengths=torch.Size((0,)),
        )
        for fqn in fqns
    ]
    _read(reader, items, planner, what)
    return planner.values


def open_dcp(path: Path, *, trust_pickle: bool) -> Checkpoint:
    """Open a DCP directory: its structure and values now, each tensor on demand."""
    what = f"DCP checkpoint {str(path)!r}"
    reader = _SafeReader(path, trust_pickle=trust_pickle)
    metadata = reader.read_metadata()
    reader.set_up_storage_reader(metadata, True)
    entries = metadata.state_dict_metadata
    values = _read_values(
        reader, [k for k, md in entries.items() if isinstance(md, BytesStorageMetadata)], trust_pickle=trust_pickle, what=what
    )
    flat: dict[str, Any] = {}
    readers: dict[int, Callable[[], torch.Tensor]] = {}
    borrowers: dict[int, Callable[[], torch.Tensor]] = {}
    spans: dict[int, Callable[[], Optional[FileSpan]]] = {}
    for fqn, md in entries.items():
        if isinstance(md, TensorStorageMetadata):
            placeholder = torch.empty(md.size, dtype=md.properties.dtype, device="meta")
            readers[id(placeholder)] = functools.partial(_read_tensor, reader, fqn, md, what)
            borrowers[id(placeholder)] = functools.partial(_borrow_tensor, reader, fqn, md, what)
            spans[id(placeholder)] = functools.partial(_span_of, reader, fqn, md, what)
            flat[fqn] = placeholder
        else:
            flat[fqn] = values[fqn]
    paths = metadata.planner_data if isinstance(metadata.planner_data, Mapping) else {}
    tree = unflatten_state_dict(flat, {fqn: tuple(paths.get(fqn) or (fqn,)) for fqn in flat})
    return Checkpoint(path, "dcp", _with_optimizer_state(tree), readers=readers, borrowers=borrowers, spans=spans)


def _with_optimizer_state(tree: Any) -> Any:
    """Put back the empty ``"state"`` of optimizers that had none (SGD without
    momentum, any optimizer before its first step): DCP stores leaves only, so
    an empty mapping does not survive it."""
    if isinstance(tree, Mapping):
        out = {key: _with_optimizer_state(value) for key, value in tree.items()}
        if isinstance(out.get(PG), list) and STATE not in out:
            out = {STATE: {}, **out}
        return out
    if isinstance(tree, list):
        return [_with_optimizer_state(value) for value in tree]
    return tree


def _check_metadata(metadata: Metadata, path: Path, what: str) -> None:
    """Check what can be checked before reading: every entry, every chunk,
    every storage record and file, so that nothing is allocated for a size
    the files do not back and no file outside ``path`` is read.

    Raises:
        CorruptCheckpointError: ``.metadata`` is inconsistent, names a file
            outside the directory, or claims more bytes than its files hold.
    """
    entries, storage = metadata.state_dict_metadata, metadata.storage_data
    if not isinstance(entries, Mapping) or not isinstance(storage, Mapping):
        raise CorruptCheckpointError(f"{what}: {DCP_METADATA} lacks its key and storage tables.")
    try:
        records = _check_storage(storage, path, what)
        for fqn, md in entries.items():
            if isinstance(md, TensorStorageMetadata):
                _check_tensor_entry(fqn, md, records, what)
            elif not isinstance(md, BytesStorageMetadata):
                raise CorruptCheckpointError(f"{what}: {fqn!r} has unknown metadata {type(md).__name__}.")
            elif MetadataIndex(fqn) not in records:
                raise CorruptCheckpointError(f"{what}: {DCP_METADATA} has no storage entry for the value {fqn!r}.")
        _check_planner_paths(metadata.planner_data, len(entries), what)
    except CorruptCheckpointError:
        raise
    except (TypeError, ValueError, AttributeError) as err:  # fields of the wrong types
        raise CorruptCheckpointError(f"{what}: {DCP_METADATA} is corrupt: {type(err).__name__}: {err}.") from None


def _check_storage(storage: Mapping[Any, Any], path: Path, what: str) -> Mapping[Any, Any]:
    """Check that every storage record lies inside a regular file inside
    ``path``, and that no two overlap; return the records."""
    sizes: dict[str, int] = {}
    missing: list[str] = []
    spans: dict[str, list[tuple[int, int, Any]]] = {}
    for index, info in storage.items():
        name = getattr(info, "relative_path", None)
        if not isinstance(name, str) or not names_inside(name):
            raise CorruptCheckpointError(
                f"{what}: {DCP_METADATA} names the storage file {name!r} for {index}, which is not a file "
                "inside the checkpoint directory; sdtree reads only files inside it (a '..' or an "
                "absolute path could read any file on this machine)."
            )
        if name not in sizes:
            sizes[name] = shard_file_size(path / name, what)
            if sizes[name] < 0:
                missing.append(name)
        offset, length = getattr(info, "offset", None), getattr(info, "length", None)
        if type(offset) is not int or type(length) is not int or offset < 0 or length < 0:
            raise CorruptCheckpointError(f"{what}: {DCP_METADATA} gives {index} the byte range offset={offset!r}, length={length!r}.")
        spans.setdefault(name, []).append((offset, offset + length, index))
    if missing:
        raise CorruptCheckpointError(
            f"{what}: {len(missing)} shard file(s) named in {DCP_METADATA} are missing: "
            f"{_preview(sorted(missing))}. Copy the whole checkpoint directory, every *.distcp file with its .metadata."
        )
    for name, ranges in spans.items():
        ranges.sort(key=lambda r: r[:2])
        for (begin, end, index), (after, _, other) in zip(ranges, ranges[1:] + [(sizes[name], 0, None)]):
            if end > after:
                where = f"the end of the file ({sizes[name]} bytes)" if other is None else f"the record of {other}"
                raise CorruptCheckpointError(
                    f"{what}: {DCP_METADATA} places {index} at bytes [{begin}, {end}) of {name!r}, past {where} "
                    "(a truncated shard file, or inconsistent metadata)."
                )
    return storage


def _check_tensor_entry(fqn: str, md: TensorStorageMetadata, records: Mapping[Any, Any], what: str) -> None:
    """The chunks of ``fqn`` tile its shape exactly, each backed by a record
    that holds at least its bytes (unless the record is transformed)."""
    size = tuple(md.size)
    dtype = md.properties.dtype
    if not isinstance(dtype, torch.dtype) or not all(type(n) is int and n >= 0 for n in size):
        raise CorruptCheckpointError(f"{what}: {DCP_METADATA} gives {fqn!r} the shape {list(size)!r} and dtype {dtype!r}.")
    boxes = [(tuple(chunk.offsets), tuple(chunk.sizes)) for chunk in md.chunks]
    for index, (offsets, sizes) in enumerate(boxes):
        inside = len(offsets) == len(sizes) == len(size) and all(
            type(o) is int and type(n) is int and o >= 0 and n >= 0 and o + n <= d for o, n, d in zip(offsets, sizes, size)
        )
        if not inside:
            raise CorruptCheckpointError(
                f"{what}: chunk {index} of {fqn!r} (offsets {list(offsets)}, sizes {list(sizes)}) lies outside its "
                f"shape {list(size)} ({DCP_METADATA} is inconsistent)."
            )
    covered = sum(math.prod(sizes) for _, sizes in boxes)
    overlap = covered == math.prod(size) and _overlap(boxes)
    if covered != math.prod(size) or overlap:
        raise CorruptCheckpointError(
            f"{what}: the chunks of {fqn!r} cover {covered} of its {math.prod(size)} elements"
            + (" and overlap" if overlap else "")
            + f" ({DCP_METADATA} is inconsistent)."
        )
    for index, chunk in enumerate(md.chunks):
        info = records.get(MetadataIndex(fqn, chunk.offsets, index))
        if info is None:
            raise CorruptCheckpointError(f"{what}: {DCP_METADATA} has no storage entry for chunk {index} of {fqn!r}.")
        nbytes = math.prod(chunk.sizes) * dtype.itemsize
        if nbytes > info.length and not getattr(info, "transform_descriptors", None):
            # A transformed (compressed) record's length does not bound its
            # contents; torch's reader inflates it as the extension says.
            raise CorruptCheckpointError(
                f"{what}: chunk {index} of {fqn!r} is {nbytes} bytes ({list(chunk.sizes)} {dtype}), but its record "
                f"in {info.relative_path!r} holds {info.length} ({DCP_METADATA} is inconsistent, or claims a huge tensor)."
            )


# The most cells _overlap counts in (4 bytes each); past it, it sweeps.
_MAX_CELLS = 1 << 22


def _overlap(boxes: list[tuple[tuple[int, ...], tuple[int, ...]]]) -> bool:
    """Whether two of the boxes (offsets, sizes), all of one rank, share an element.

    The boxes' edges cut the shape into a grid of cells (one per shard, for a
    tensor sharded on a grid); each box adds one to the cells it covers.
    Where that grid is too large, a sweep along one dimension compares each
    box with those still open there.
    """
    boxes = [(o, s) for o, s in boxes if all(s)]  # an empty box shares nothing
    if len(boxes) < 2:
        return False
    ndim = len(boxes[0][0])
    if ndim == 0:
        return True  # both hold the one element
    cuts = [sorted({o[d] for o, _ in boxes} | {o[d] + s[d] for o, s in boxes}) for d in range(ndim)]
    if math.prod(len(c) - 1 for c in cuts) <= _MAX_CELLS:
        where = [{x: i for i, x in enumerate(c)} for c in cuts]
        count = torch.zeros([len(c) - 1 for c in cuts], dtype=torch.int32)
        for o, s in boxes:
            count[tuple(slice(where[d][o[d]], where[d][o[d] + s[d]]) for d in range(ndim))] += 1
        return bool((count > 1).any())
    dim = max(range(ndim), key=lambda d: len(cuts[d]))
    open_: list[tuple[tuple[int, ...], tuple[int, ...]]] = []
    for offsets, sizes in sorted(boxes, key=lambda box: box[0][dim]):
        open_ = [(o, s) for o, s in open_ if o[dim] + s[dim] > offsets[dim]]
        if any(all(a < c + d and c < a + b for a, b, c, d in zip(o, s, offsets, sizes)) for o, s in open_):
            return True
        open_.append((offsets, sizes))
    return False


def _check_planner_paths(planner_data: Any, count: int, what: str) -> None:
    """Each key's path in the tree is a tuple of keys and list positions that exist."""
    if not isinstance(planner_data, Mapping):
        return
    for fqn, where in planner_data.items():
        if not isinstance(where, (tuple, list)) or not all(
            type(p) is str or (type(p) is int and 0 <= p < count) for p in where
        ):
            raise CorruptCheckpointError(f"{what}: {DCP_METADATA} gives {fqn!r} the tree path {reprlib.repr(where)}.")


# -- calling torch's DCP API -------------------------------------------------------


@contextmanager
def quiet_single_process() -> Iterator[None]:
    """Silence torch's warning that a DCP call without a process group runs in one process."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled", category=UserWarning)
        yield


@contextmanager
def unwrapped_errors(fn: str) -> Iterator[None]:
    """Re-raise sdtree's and OS errors that DCP wrapped in a ``CheckpointException``."""
    try:
        yield
    except CheckpointException as wrapped:
        failures = [exc for _, (exc, _) in sorted(wrapped.failures.items())]
        for exc in failures:
            if isinstance(exc, (SdtreeError, OSError)):
                raise exc from None
        for exc in failures:
            if isinstance(exc, RuntimeError) and "Missing key" in str(exc):
                raise IncompatibleStateDictError(
                    f"{fn}: {exc} Pass a template that holds only keys the checkpoint has."
                ) from None
        raise


# -- loading into a template (resharding) ---------------------------------------


class _SafeLoadPlanner(DefaultLoadPlanner):
    """torch's load planner, but non-tensor values are unpickled safely."""

    def __init__(self, *, trust_pickle: bool, what: str) -> None:
        super().__init__()
        self.trust_pickle = trust_pickle
        self.what = what

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        fqn = read_item.dest_index.fqn
        loaded = torch_load(value, what=f"{self.what}: {fqn!r}", trust_pickle=self.trust_pickle)
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[fqn], loaded)
        else:
            self.state_dict[fqn] = loaded


def load_dcp_into(path: Path, template: Any, *, trust_pickle: bool, process_group: Any = None) -> Any:
    """Read a DCP checkpoint into new tensors shaped (and sharded) like ``template``'s.

    Collective when a process group of several ranks is up: each rank reads
    the parts of the tensors that its shards (DTensor placements) hold.
    """
    what = f"DCP checkpoint {str(path)!r}"
    target = tree_map(lambda leaf: torch.empty_like(leaf) if isinstance(leaf, torch.Tensor) else leaf, template)
    reader = _SafeReader(path, trust_pickle=trust_pickle)
    try:
        with quiet_single_process(), unwrapped_errors("load"):
            dcp_load(
                target,
                storage_reader=reader,
                planner=_SafeLoadPlanner(trust_pickle=trust_pickle, what=what),
                process_group=process_group,
                no_dist=not several_ranks(process_group),
            )
    except CheckpointException:
        if reader.failure is not None:  # every rank read the same .metadata, so all raise this
            raise reader.failure from None
        raise
    return target
