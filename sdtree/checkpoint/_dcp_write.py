"""Write ``torch.distributed.checkpoint`` (DCP) directories.

Writing goes through ``torch.distributed.checkpoint.save``, laid out as
``dcp.save`` lays it out (one ``__<rank>_0.distcp`` data file per rank beside
``.metadata``), with a planner that fetches each tensor only when the writer
asks for it and a writer that lets go of it once it is written, so a
conversion holds one tensor at a time. From several ranks the save is
collective and sharded, and the ranks agree before anything is written and
before it is renamed into place. ``.metadata`` names the checkpoint by its
final path, not by the temporary directory it is written in.

Each tensor's record is the ``torch.save`` archive torch's writer makes,
written by :func:`write_tensor_archive` rather than by ``torch.save``: its
bytes come as pieces (``_spans``), copied from the source file where it
stores them, and their CRC is summed by zlib beside the copy.
"""

from __future__ import annotations

import collections
import io
import os
import pickle
import struct
import sys
import zlib
from collections.abc import Mapping
from pathlib import Path
from typing import IO, Any, Optional

import optree
import torch
import torch.distributed as dist
from torch.distributed.checkpoint.default_planner import DefaultSavePlanner
from torch.distributed.checkpoint.filesystem import DEFAULT_SUFFIX, FileSystemWriter, _StorageInfo
from torch.distributed.checkpoint.metadata import StorageMeta
from torch.distributed.checkpoint.planner import SavePlan, SavePlanner, WriteItem, WriteItemType
from torch.distributed.checkpoint.state_dict_saver import save as dcp_save
from torch.distributed.checkpoint.storage import WriteResult
from torch.futures import Future

from sdtree._collectives import agree, first_error, from_leader, portable_error, several_ranks
from sdtree._tree import tree_flatten_with_accessor
from sdtree.checkpoint._atomic import atomic_destination, check_destination, commit, remove, start_writeback, temporary_name
from sdtree.checkpoint._dcp_read import quiet_single_process, unwrapped_errors
from sdtree.checkpoint._lazy import Fetch, as_is
from sdtree.checkpoint._spans import Piece, pieces_of, write_pieces
from sdtree.transforms.tensors import contiguous_strides
from sdtree.errors import CheckpointFormatError

__all__ = ["check_keys", "write_dcp", "save_dcp", "write_tensor_archive", "ZIP32_LIMIT"]


class _FetchingSavePlanner(DefaultSavePlanner):
    """torch's save planner, but a plain tensor is fetched only when the writer needs it."""

    def __init__(self, fetch: Fetch) -> None:
        super().__init__()
        self._fetch = fetch

    def resolve_data(self, write_item: WriteItem) -> torch.Tensor | io.BytesIO:
        if write_item.type == WriteItemType.TENSOR:
            return self._fetch(self.lookup_object(write_item.index))
        return super().resolve_data(write_item)

    def pieces(self, write_item: WriteItem) -> Optional[tuple[torch.Tensor, list[Piece]]]:
        """The tensor of ``write_item`` and the pieces of its bytes, if it is
        a whole tensor whose bytes come in pieces (see ``_spans``)."""
        if write_item.type != WriteItemType.TENSOR or write_item.tensor_data is None:
            return None
        leaf = self.lookup_object(write_item.index)
        chunk = write_item.tensor_data.chunk
        if not isinstance(leaf, torch.Tensor) or any(chunk.offsets) or tuple(chunk.sizes) != tuple(leaf.shape):
            return None
        if leaf.numel() * leaf.element_size() >= ZIP32_LIMIT:
            return None  # its record would need zip64 fields: torch.save writes it
        found = pieces_of(self._fetch, leaf)
        return None if found is None else (leaf, found)


def check_keys(tree: Any, fn: str) -> None:
    """DCP stores every mapping key as a string; refuse keys that would not load back."""
    if not isinstance(tree, Mapping):
        raise CheckpointFormatError(
            f"{fn}: a DCP checkpoint holds a dict, got a {type(tree).__name__}. Wrap it: {{'model': ...}}."
        )
    accessors, _, _ = tree_flatten_with_accessor(tree)
    for accessor in accessors:
        for depth, entry in enumerate(accessor):
            if isinstance(entry, optree.MappingEntry) and type(entry.entry) is not str:
                where = ".".join(str(e.entry) for e in list(accessor)[: depth + 1])
                raise CheckpointFormatError(
                    f"{fn}: DCP stores mapping keys as strings, so the key {entry.entry!r} at {where!r} "
                    "would load back as a string. Key optimizer state by FQNs "
                    "(sdtree.get_optimizer_state_dict, or param_ids_to_fqns(...)), or write a 'torch' file (*.pt), which keeps them."
                )


class _OneFilePerRankWriter(FileSystemWriter):
    """torch's file system writer, writing each rank's items into one data
    file as ``dcp.save`` does, but tensor by tensor: torch's own keeps every
    tensor of a file alive until the file is done, which for a streamed
    conversion is the whole checkpoint. ``.metadata`` records
    ``checkpoint_id``, where the directory being written will end up; with
    ``sync``, each file is flushed to the disk (``fsync``) once written."""

    def __init__(self, directory: Path, checkpoint_id: Path, *, sync: bool) -> None:
        super().__init__(directory, single_file_per_rank=True, thread_count=1, sync_files=sync)
        self._checkpoint_id = checkpoint_id
        self._what = f"DCP checkpoint {str(checkpoint_id)!r}"

    def storage_meta(self) -> Optional[StorageMeta]:
        meta = super().storage_meta()
        if meta is not None:
            meta.checkpoint_id = self._checkpoint_id
        return meta

    def write_data(self, plan: SavePlan, planner: SavePlanner) -> Future[list[WriteResult]]:
        name = f"{plan.storage_data.prefix}0{DEFAULT_SUFFIX}"  # __<rank>_0.distcp
        values_first = sorted(plan.items, key=lambda item: item.type != WriteItemType.BYTE_IO)  # torch's order
        results = []
        with open(Path(self.path) / name, "wb") as stream:
            for item in values_first:
                offset = stream.tell()
                pieces = planner.pieces(item) if isinstance(planner, _FetchingSavePlanner) else None
                if pieces is not None:
                    write_tensor_archive(stream, *pieces, f"{self._what}: {item.index.fqn!r}")
                else:
                    data = planner.resolve_data(item)
                    if isinstance(data, io.BytesIO):
                        stream.write(data.getbuffer())
                    else:
                        tensor = _compact_cpu(data)
                        if _archivable(tensor):
                            write_tensor_archive(stream, tensor, [lambda: tensor], f"{self._what}: {item.index.fqn!r}")
                        else:
                            torch.save(tensor, stream)
                        del tensor
                    del data  # before the next is fetched
                length = stream.tell() - offset
                results.append(WriteResult(index=item.index, size_in_bytes=length, storage_data=_StorageInfo(name, offset, length)))
                if self.sync_files:
                    start_writeback(stream, offset)
            if self.sync_files:
                stream.flush()
                os.fsync(stream.fileno())
        done: Future[list[WriteResult]] = Future()
        done.set_result(results)
        return done


# -- a torch.save archive of a stored tensor ----------------------------------------

ZIP32_LIMIT = 0xFFFFFFFF  # below this size a record needs no zip64 fields; a larger one goes through torch.save
_ALIGN = 64  # torch aligns each record's data to 64 bytes (``.storage_alignment``), for mmap loads


def _archivable(tensor: torch.Tensor) -> bool:
    """Whether :func:`write_tensor_archive` writes ``tensor`` (a compact CPU
    tensor): plain strided data under 4 GiB; torch.save writes the rest."""
    return (
        tensor.layout == torch.strided and not tensor.is_quantized and tensor.device.type == "cpu"
        and tensor.is_contiguous() and tensor.numel() * tensor.element_size() < ZIP32_LIMIT
    )


def write_tensor_archive(out: IO[bytes], leaf: torch.Tensor, pieces: list[Piece], what: str) -> None:
    """Append to ``out`` the ``torch.save`` archive of the tensor ``leaf``
    (shape and dtype), laid out as torch lays it out (the records, names,
    alignment and zip64 end records of miniz). Its bytes are ``pieces`` (see
    ``_spans``): spans of files, copied by the kernel, and tensors, written
    from their memory; either way their CRC is summed by zlib in a second
    thread beside the copy (miniz's own, in torch.save, sums at about a
    third of the speed, before it writes). ``what`` names the tensor in errors."""
    start = out.tell()
    central = []
    pickled = _tensor_pickle(leaf)

    def record(name: str, small: Optional[bytes]) -> None:
        at = out.tell() - start
        encoded = f"archive/{name}".encode()
        pad = -(at + 30 + len(encoded) + 4) % _ALIGN
        extra = b"FB" + struct.pack("<H", pad) + b"Z" * pad
        out.write(struct.pack("<4sHHHHHIIIHH", b"PK\x03\x04", 0, _FLAGS, 0, 0, 0, 0, 0, 0, len(encoded), len(extra)))
        out.write(encoded + extra)
        if small is not None:
            out.write(small)
            crc, size = zlib.crc32(small), len(small)
        else:
            summed = write_pieces(out, pieces, leaf, crc=True, what=what)
            assert summed is not None  # asked for
            crc, size = summed, leaf.numel() * leaf.element_size()
        out.write(struct.pack("<4sIII", b"PK\x07\x08", crc, size, size))
        central.append(
            struct.pack("<4sHHHHHHIIIHHHHHII", b"PK\x01\x02", 0, 0, _FLAGS, 0, 0, 0, crc, size, size, len(encoded), 0, 0, 0, 0, 0, at)
            + encoded
        )

    record("data.pkl", pickled)
    record(".format_version", b"1")
    record(".storage_alignment", str(_ALIGN).encode())
    record("byteorder", sys.byteorder.encode())
    record("data/0", None)
    record("version", b"3\n")
    record(".data/serialization_id", f"{zlib.crc32(pickled):040d}".encode())
    directory = out.tell() - start
    out.write(b"".join(central))
    size, n = out.tell() - start - directory, len(central)
    end64 = out.tell() - start
    out.write(struct.pack("<4sQHHIIQQQQ", b"PK\x06\x06", 44, 0x031E, 0x002D, 0, 0, n, n, size, directory))
    out.write(struct.pack("<4sIQI", b"PK\x06\x07", 0, end64, 1))
    out.write(struct.pack("<4sHHHHIIH", b"PK\x05\x06", 0, 0, n, n, size, directory, 0))


_FLAGS = 0x0808  # sizes and CRC in a descriptor after the data; UTF-8 names (as miniz writes for torch)


class _StorageRef:
    """Stands for the storage in a tensor's pickle: pickled by reference."""


class _TensorPickler(pickle.Pickler):
    def __init__(self, file: IO[bytes], storage: tuple[Any, ...]) -> None:
        super().__init__(file, protocol=2)
        self._storage = storage

    def persistent_id(self, obj: Any) -> Optional[tuple[Any, ...]]:
        return self._storage if isinstance(obj, _StorageRef) else None


class _Rebuilt:
    """Pickles as ``torch._utils._rebuild_tensor_v2`` of a contiguous tensor, as torch pickles one."""

    def __init__(self, leaf: torch.Tensor) -> None:
        self._shape, self._stride = tuple(leaf.shape), contiguous_strides(tuple(leaf.shape))

    def __reduce__(self) -> tuple[Any, ...]:
        return (torch._utils._rebuild_tensor_v2, (_StorageRef(), 0, self._shape, self._stride, False, collections.OrderedDict()))


def _tensor_pickle(leaf: torch.Tensor) -> bytes:
    """The ``data.pkl`` torch.save writes for a contiguous CPU tensor of ``leaf``'s shape and dtype."""
    typed = torch.storage.TypedStorage(wrap_storage=torch.UntypedStorage(0), dtype=leaf.dtype, _internal=True)  # type: ignore[no-untyped-call]
    storage_type = getattr(torch, typed._pickle_storage_type())  # type: ignore[no-untyped-call]
    buffer = io.BytesIO()
    _TensorPickler(buffer, ("storage", storage_type, "0", "cpu", leaf.numel())).dump(_Rebuilt(leaf))
    return buffer.getvalue()


def _compact_cpu(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` on the CPU with a storage of exactly its data, as torch's writer stores it."""
    tensor = tensor.detach().cpu()
    return tensor.clone() if tensor.untyped_storage().size() != tensor.nbytes else tensor


def write_dcp(
    directory: Path,
    tree: Any,
    fetch: Fetch,
    *,
    fn: str,
    checkpoint_id: Path,
    sync: bool,
    no_dist: bool = True,
    process_group: Any = None,
) -> None:
    """Write ``tree`` into the (empty) ``directory``, fetching each tensor as it
    is written and releasing it before the next; ``checkpoint_id`` is the path
    the directory will be renamed to, which ``.metadata`` records; ``sync``:
    each file is flushed to the disk once written."""
    check_keys(tree, fn)
    with quiet_single_process(), unwrapped_errors(fn):
        dcp_save(
            dict(tree),
            storage_writer=_OneFilePerRankWriter(directory, checkpoint_id, sync=sync),
            planner=_FetchingSavePlanner(fetch),
            no_dist=no_dist,
            process_group=process_group,
        )


def save_dcp(state_dict: Any, path: Path, *, force: bool, fn: str, sync: bool, process_group: Any = None) -> None:
    """Save ``state_dict`` as a DCP directory: collectively (sharded) when a
    process group of several ranks is up, else from this process alone.

    Collective: every rank checks its input, then the ranks agree (all raise
    the same error, or none); the lowest rank of the group creates the
    temporary directory and renames it into place once all shards are written.
    """
    if not several_ranks(process_group):
        check_keys(state_dict, fn)
        with atomic_destination(path, force=force, directory=True, fn=fn, sync=sync) as tmp:
            write_dcp(tmp, state_dict, as_is, fn=fn, checkpoint_id=path, sync=sync)
        return
    agree(lambda: check_keys(state_dict, fn), catch=(Exception,), report=portable_error, fail=first_error, group=process_group)
    leader = dist.get_global_rank(process_group, 0) if process_group is not None else 0
    is_leader = dist.get_rank() == leader
    tmp = Path(from_leader(lambda: _prepare(path, force, fn), leader, process_group))
    try:
        write_dcp(tmp, state_dict, as_is, fn=fn, checkpoint_id=path, sync=sync, no_dist=False, process_group=process_group)
    except BaseException:
        if is_leader:
            remove(tmp)
        raise
    from_leader(lambda: _commit_or_remove(tmp, path, force, fn, sync), leader, process_group)


def _prepare(path: Path, force: bool, fn: str) -> str:
    check_destination(path, force=force, fn=fn)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_name(path)
    tmp.mkdir()
    return str(tmp)


def _commit_or_remove(tmp: Path, path: Path, force: bool, fn: str, sync: bool) -> None:
    try:
        commit(tmp, path, force=force, fn=fn, sync=sync)
    except BaseException:
        remove(tmp)
        raise
