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
from sdtree.checkpoint._lazy import Checkpoint, read_into
from sdtree.checkpoint._pickle import LOAD_ERRORS, load_dcp_metadata, load_error, torch_load
from sdtree.checkpoint._torch_file import byteorder
from sdtree.errors import CorruptCheckpointError, IncompatibleStateDictError, SdtreeError, preview as _preview
from sdtree.types import PG, STATE
from sdtree.transforms.nested import unflatten_state_dict

__all__ = ["open_dcp", "load_dcp_into", "quiet_single_process", "unwrapped_errors"]


# -- reading ------------------------------------------------------------------


class _SafeReader(FileSystemReader):
    """torch's reader, but ``.metadata`` is unpickled without running code."""

    def __init__(self, path: Path, *, trust_pickle: bool) -> None:
        super().__init__(path)
        self.trust_pickle = trust_pickle

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        path = self._get_metadata_path(kwargs.get("rank"))
        what = f"DCP checkpoint {str(self.path)!r}: {DCP_METADATA}"
        with self.fs.create_stream(path, "rb") as file:
            metadata = load_dcp_metadata(cast(IO[bytes], file), what=what, trust_pickle=self.trust_pickle)
        if not isinstance(metadata, Metadata):
            raise CorruptCheckpointError(f"{what} holds a {type(metadata).__name__}, not DCP Metadata.")
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
    except KeyError as err:
        raise CorruptCheckpointError(f"{what}: {DCP_METADATA} has no storage entry for {err}.") from None
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


# Below this size a chunk is read through torch's reader; above it, the cost of
# locating its bytes first is repaid by reading them straight into place.
_IN_PLACE_MIN_BYTES = 1 << 20


def _read_chunks_in_place(reader: FileSystemReader, fqn: str, md: TensorStorageMetadata, target: torch.Tensor, what: str) -> bool:
    """Read each chunk's bytes straight into its slice of ``target`` (no copy
    through a temporary tensor); return False, having maybe filled part of
    ``target``, where a chunk is stored in a way this does not handle."""
    if target.numel() * target.element_size() < _IN_PLACE_MIN_BYTES:
        return False
    places = []
    for index, chunk in enumerate(md.chunks):
        info = reader.storage_data.get(MetadataIndex(fqn, chunk.offsets, index))
        dest = _narrow(target, chunk.offsets, chunk.sizes)
        if info is None or getattr(info, "transform_descriptors", None) or not dest.is_contiguous():
            return False
        places.append((Path(reader.path) / info.relative_path, info.offset, info.length, dest))
    for path, offset, length, dest in places:
        start = _tensor_data_offset(path, offset, length, dest, what)
        if start is None:
            return False
        read_into(path, offset + start, dest, what=what)
    return True


def _tensor_data_offset(path: Path, offset: int, length: int, dest: torch.Tensor, what: str) -> Optional[int]:
    """Where, in the ``torch.save`` blob at ``offset`` of ``path``, the data of a
    tensor shaped like ``dest`` starts; None unless it is stored plainly."""
    with open(path, "rb") as file:
        blob = _Window(file, offset, length)
        meta = torch_load(blob, what=what, trust_pickle=False, map_location="meta")
        plain = (
            type(meta) is torch.Tensor
            and meta.is_meta
            and meta.shape == dest.shape
            and meta.dtype == dest.dtype
            and meta.is_contiguous()
            and meta.storage_offset() == 0
        )
        if not plain:
            return None
        blob.seek(0)
        if byteorder(blob) not in (None, sys.byteorder):
            return None
    return getattr(meta.untyped_storage(), "_checkpoint_offset", None)


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
    _check_metadata(metadata, path, what)
    reader.set_up_storage_reader(metadata, True)
    entries = metadata.state_dict_metadata
    values = _read_values(
        reader, [k for k, md in entries.items() if isinstance(md, BytesStorageMetadata)], trust_pickle=trust_pickle, what=what
    )
    flat: dict[str, Any] = {}
    readers: dict[int, Callable[[], torch.Tensor]] = {}
    for fqn, md in entries.items():
        if isinstance(md, TensorStorageMetadata):
            placeholder = torch.empty(md.size, dtype=md.properties.dtype, device="meta")
            readers[id(placeholder)] = functools.partial(_read_tensor, reader, fqn, md, what)
            flat[fqn] = placeholder
        else:
            flat[fqn] = values[fqn]
    paths = metadata.planner_data if isinstance(metadata.planner_data, Mapping) else {}
    tree = unflatten_state_dict(flat, {fqn: tuple(paths.get(fqn) or (fqn,)) for fqn in flat})
    return Checkpoint(path, "dcp", _with_optimizer_state(tree), readers=readers)


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
    """Check what can be checked before reading: entries, chunk coverage, files."""
    entries, storage = metadata.state_dict_metadata, metadata.storage_data
    if not isinstance(entries, Mapping) or not isinstance(storage, Mapping):
        raise CorruptCheckpointError(f"{what}: {DCP_METADATA} lacks its key and storage tables.")
    for fqn, md in entries.items():
        if isinstance(md, TensorStorageMetadata):
            covered = sum(torch.Size(c.sizes).numel() for c in md.chunks)
            if covered != torch.Size(md.size).numel():
                raise CorruptCheckpointError(
                    f"{what}: the chunks of {fqn!r} cover {covered} of its {torch.Size(md.size).numel()} "
                    f"elements ({DCP_METADATA} is inconsistent)."
                )
        elif not isinstance(md, BytesStorageMetadata):
            raise CorruptCheckpointError(f"{what}: {fqn!r} has unknown metadata {type(md).__name__}.")
    files = {getattr(info, "relative_path", None) for info in storage.values()}
    missing = sorted(str(name) for name in files if not isinstance(name, str) or not (path / name).is_file())
    if missing:
        raise CorruptCheckpointError(
            f"{what}: {len(missing)} shard file(s) named in {DCP_METADATA} are missing: "
            f"{_preview(missing)}. Copy the whole checkpoint directory, every *.distcp file with its .metadata."
        )


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
    with quiet_single_process(), unwrapped_errors("load"):
        dcp_load(
            target,
            storage_reader=_SafeReader(path, trust_pickle=trust_pickle),
            planner=_SafeLoadPlanner(trust_pickle=trust_pickle, what=what),
            process_group=process_group,
            no_dist=not several_ranks(process_group),
        )
    return target
