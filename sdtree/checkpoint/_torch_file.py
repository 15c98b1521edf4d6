"""``torch.save`` files: open lazily, write one tensor at a time.

Reading: a ``torch.save`` file is a zip archive of a pickle (``data.pkl``)
and one record per storage (``data/<key>``). Opening it checks the archive's
directory, then unpickles the structure with torch's own weights-only
unpickler (the one ``torch.load(weights_only=True)`` runs), each storage a
meta placeholder that names its record; a tensor is then read on demand from
its record through Python's ``zipfile``, which inflates a deflated record and
checks its CRC.

Why not ``torch.load`` itself: ``torch.load(mmap=True)`` maps each storage
at its record's offset and trusts the archive: a record re-zipped deflated
maps as its compressed bytes, a record shorter than its tensor reads on into
the next, and no CRC is checked; ``torch.load(map_location="meta")`` computes
the offsets assuming torch's own zip layout, so a re-zipped file reads other
bytes. Both return wrong values silently. Before a record is read, its size
is checked against what the pickle claims and against the file, so no
allocation follows a size field the file does not back.

Legacy (pre-zip) files have no such index: their storages are allocated from
size fields before anything can be checked, so they are read (whole, by
``torch.load``) only with ``trust_pickle=True``.

Writing: the structure is pickled first, each tensor as a reference to a
storage record, the way ``torch.save`` pickles it; then each tensor is
fetched and written as its own record through torch's zip writer, and
dropped. The file loads with plain ``torch.load(weights_only=True)``.
Tensors are stored compactly (a view stores only its own elements), and one
stored tensor serves every key that holds the same view of the same memory,
so tied parameters load back as one tensor object.
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import functools
import io
import pickle
import reprlib
import struct
import sys
import zipfile
import zlib
from collections.abc import Hashable
from pathlib import Path
from typing import IO, Any, Callable, Optional, Union, cast

import attrs
import torch
from torch.utils.serialization import config as serialization_config

from sdtree._tree import tree_flatten, tree_flatten_with_path, tree_unflatten
from sdtree.checkpoint._formats import ZIP_MAGIC
from sdtree.checkpoint._lazy import Checkpoint, Fetch, dotted, fetched_plain, first_aliases
from sdtree.checkpoint._mapped import crc_of, map_bytes
from sdtree.checkpoint._spans import FileSpan
from sdtree.checkpoint._pickle import TRUST_HINT, torch_load, unpickle_torch_data
from sdtree.errors import CheckpointFormatError, CorruptCheckpointError, UnsupportedLeafError
from sdtree.transforms.tensors import contiguous_strides

__all__ = ["open_torch_file", "write_torch_file", "TorchArchive", "Record"]

# Leaves that cannot hide a tensor inside them; any other leaf type means the
# file is read whole, so no tensor is left as a placeholder in an opaque object.
_PLAIN_LEAVES = (int, float, complex, str, bytes, bool, type(None), torch.Size, torch.dtype, torch.device)


# -- reading ------------------------------------------------------------------


def open_torch_file(path: Path, *, trust_pickle: bool) -> Checkpoint:
    """Open a ``torch.save`` file: its structure now, each tensor on demand."""
    what = f"torch.save file {str(path)!r}"
    with open(path, "rb") as file:
        zipped = file.read(len(ZIP_MAGIC)) == ZIP_MAGIC
    if not zipped:
        if not trust_pickle:
            raise CheckpointFormatError(
                f"{what} is in torch.save's legacy (pre-1.6, non-zip) format, which sdtree reads "
                "only from trusted files: its storages are allocated from size fields in the file "
                "before anything can be checked. Re-save it with a current torch "
                f"(torch.save(torch.load(path, weights_only=True), new_path)). {TRUST_HINT}"
            )
        return Checkpoint(path, "torch", torch_load(str(path), what=what, trust_pickle=True), readers={})
    archive = TorchArchive.open(path, path.stat().st_size, what)
    tree = archive.skeleton(trust_pickle=trust_pickle)
    leaves, spec = tree_flatten(tree)
    if not all(_lazy_ok(leaf) for leaf in leaves):
        # An object sdtree cannot walk into may hold tensors: let torch.load
        # build it, from records whose sizes and CRCs are checked first.
        archive.check_all()
        return Checkpoint(path, "torch", torch_load(str(path), what=what, trust_pickle=trust_pickle), readers={})
    readers: dict[int, Callable[[], torch.Tensor]] = {}
    seen: dict[Hashable, torch.Tensor] = {}
    for i, leaf in enumerate(leaves):
        record = TorchArchive.record_of(leaf) if isinstance(leaf, torch.Tensor) else None
        if record is None or id(leaf) in readers:  # not a tensor (every tensor has a record)
            continue
        place = (record, leaf.storage_offset(), tuple(leaf.shape), leaf.stride(), leaf.dtype)
        if place in seen:  # another view of the same bytes: a tied tensor
            leaves[i] = seen[place]
            continue
        seen[place] = leaf
        readers[id(leaf)] = functools.partial(archive.read, record, leaf)
    return Checkpoint(path, "torch", tree_unflatten(spec, leaves), readers=readers)


def _lazy_ok(leaf: Any) -> bool:
    if isinstance(leaf, torch.Tensor):
        return (
            (type(leaf) is torch.Tensor or isinstance(leaf, torch.nn.Parameter))
            and TorchArchive.record_of(leaf) is not None
        )
    return isinstance(leaf, _PLAIN_LEAVES)


# The most deflate can shrink data (zlib's technical notes: 1032:1); a record
# that claims more is a zip bomb, refused before anything is allocated for it.
_DEFLATE_MAX_RATIO = 1032
_CHUNK = 1 << 24
_RECORD = "_sdtree_record"  # the attribute naming a placeholder storage's record


@attrs.frozen
class Record:
    """The storage record ``data/<key>`` a placeholder is read from, and its size."""

    key: str
    nbytes: int


class TorchArchive:
    """The zip archive of a ``torch.save`` file (or of a DCP shard's blob),
    its directory checked: each tensor is read from its own storage record.

    ``zipfile`` parses the directory; records are read here, straight into
    the tensor that receives them (``zipfile`` would copy each twice, and it
    refuses the CRC 0 that torch writes when ``set_crc32_options(False)``
    turned CRCs off: such a record is read unchecked, as ``torch.load`` reads
    every record). Open it with :meth:`open`; ``what`` names the file in errors.
    """

    def __init__(self, source: Union[Path, io.IOBase], entries: dict[str, zipfile.ZipInfo], prefix: str, what: str) -> None:
        self.source, self.entries, self.prefix, self.what = source, entries, prefix, what
        self.byteorder = self._byteorder()

    @classmethod
    def open(cls, source: Union[Path, io.IOBase], size: int, what: str) -> TorchArchive:
        """Open the archive in ``source`` (a file, or a seekable file object
        kept open while the archive is read), ``size`` bytes, and check its directory.

        Raises:
            CorruptCheckpointError: it is not a zip archive, or an entry is
                encrypted, compressed other than by deflate, larger than its
                bytes can hold, or overlaps another.
        """
        try:
            with zipfile.ZipFile(source if isinstance(source, Path) else cast(IO[bytes], source)) as archive:
                infos = archive.infolist()
        except (zipfile.BadZipFile, EOFError, OSError, ValueError) as err:
            raise CorruptCheckpointError(f"{what} is corrupt or truncated: it is not a readable zip archive ({err}).") from None
        prefix = _check_entries(infos, size, what)
        return cls(source, {info.filename: info for info in infos}, prefix, what)

    @staticmethod
    def record_of(leaf: torch.Tensor) -> Optional[Record]:
        """The record a placeholder made by :meth:`skeleton` is read from."""
        if not leaf.is_meta or leaf.layout != torch.strided:  # a sparse tensor has no storage of its own
            return None
        return getattr(leaf.untyped_storage(), _RECORD, None)

    def skeleton(self, *, trust_pickle: bool) -> Any:
        """The pickled state dict, each tensor a meta placeholder on a storage
        that names its record (checked to exist and to hold its bytes).

        Raises:
            UnsafeCheckpointError: the pickle imports something
                ``torch.load(weights_only=True)`` refuses (unless ``trust_pickle``).
            CorruptCheckpointError: it cannot be unpickled, names a missing
                record, or a tensor spans more bytes than its record holds.
        """
        info = self.entries.get(self.prefix + "data.pkl")
        if info is None:
            raise CorruptCheckpointError(f"{self.what} is corrupt: the zip archive holds no {self.prefix}data.pkl, so it is not a torch.save file.")
        storages: dict[str, torch.storage.TypedStorage] = {}

        def persistent_load(saved_id: Any) -> torch.storage.TypedStorage:
            key, dtype, nbytes = _storage_claim(saved_id, self.what)
            if key not in storages:
                storages[key] = self._placeholder_storage(key, dtype, nbytes)
            return storages[key]

        tree = unpickle_torch_data(self._read_whole(info), persistent_load, what=self.what, trust_pickle=trust_pickle)
        for path, leaf in zip(*tree_flatten_with_path(tree)[:2]):
            record = self.record_of(leaf) if isinstance(leaf, torch.Tensor) else None
            if record is not None:
                _check_view(leaf, record, dotted(path), self.what)
        return tree

    def _placeholder_storage(self, key: str, dtype: torch.dtype, nbytes: int) -> torch.storage.TypedStorage:
        info = self.entries.get(f"{self.prefix}data/{key}")
        if info is None:
            raise CorruptCheckpointError(
                f"{self.what} is corrupt: its pickle references the storage record {self.prefix}data/{key}, "
                "which the archive lacks (truncated or re-zipped without it?)."
            )
        if info.file_size != nbytes:
            raise CorruptCheckpointError(
                f"{self.what} is corrupt: the storage record {info.filename} holds {info.file_size} bytes, "
                f"but the pickle claims {nbytes} ({dtype})."
            )
        storage = torch.UntypedStorage(nbytes, device="meta")  # type: ignore[no-untyped-call]  # untyped in torch
        setattr(storage, _RECORD, Record(key, nbytes))
        return torch.storage.TypedStorage(wrap_storage=storage, dtype=dtype, _internal=True)  # type: ignore[no-untyped-call]

    def _byteorder(self) -> Optional[str]:
        """The byte order the archive records (``None``: not recorded)."""
        info = self.entries.get(self.prefix + "byteorder")
        if info is None:
            return None
        order = self._read_whole(info).decode(errors="replace")
        if order not in ("little", "big"):
            raise CorruptCheckpointError(f"{self.what} is corrupt: its byteorder record says {order!r}, not 'little' or 'big'.")
        return order

    def _read_whole(self, info: zipfile.ZipInfo) -> bytes:
        data = bytearray(info.file_size)
        self._read_entry(info, memoryview(data))
        return bytes(data)

    def _read_entry(self, info: zipfile.ZipInfo, view: memoryview) -> None:
        """Read the entry ``info`` (exactly ``len(view)`` bytes) into ``view``; check its CRC."""
        try:
            with contextlib.ExitStack() as stack:
                file = stack.enter_context(open(self.source, "rb")) if isinstance(self.source, Path) else self.source
                start = _data_start(file, info)
                if info.compress_type == zipfile.ZIP_STORED:
                    done = _read_stored(file, start, view)
                else:
                    done = _inflate(file, start, info.compress_size, view)
        except (zipfile.BadZipFile, zlib.error, OSError) as err:
            raise CorruptCheckpointError(f"{self.what} is corrupt or truncated: {info.filename}: {err}") from None
        if done != len(view):
            raise CorruptCheckpointError(
                f"{self.what} is truncated: its record {info.filename} gave {done} of its {len(view)} bytes."
            )
        if info.CRC and zlib.crc32(view) != info.CRC:  # 0: torch wrote no CRC
            raise CorruptCheckpointError(f"{self.what} is corrupt: its record {info.filename} fails its CRC check.")

    def read_record_into(self, key: str, out: torch.Tensor) -> None:
        """Read the record ``data/<key>`` into the contiguous CPU tensor ``out``
        (exactly its size), checking its CRC."""
        info = self.entries.get(f"{self.prefix}data/{key}")
        nbytes = out.numel() * out.element_size()
        if info is None or info.file_size != nbytes:
            raise CorruptCheckpointError(f"{self.what} is corrupt: storage record data/{key} is missing or resized.")
        self._read_entry(info, memoryview((ctypes.c_ubyte * nbytes).from_address(out.data_ptr())).cast("B") if nbytes else memoryview(b""))

    def _stored_record(self, key: str) -> Optional[tuple[zipfile.ZipInfo, int]]:
        """The entry of the record ``data/<key>`` and where its data starts in
        the archive; ``None`` where it is compressed (it must be read)."""
        info = self.entries.get(f"{self.prefix}data/{key}")
        if info is None or info.compress_type != zipfile.ZIP_STORED:
            return None
        try:
            with contextlib.ExitStack() as stack:
                file = stack.enter_context(open(self.source, "rb")) if isinstance(self.source, Path) else self.source
                return info, _data_start(file, info)
        except (zipfile.BadZipFile, OSError) as err:
            raise CorruptCheckpointError(f"{self.what} is corrupt or truncated: {info.filename}: {err}") from None

    def map_record(self, key: str, path: Path, base: int) -> Optional[torch.Tensor]:
        """The record ``data/<key>`` as a uint8 tensor over a private mapping
        of ``path`` (which holds this archive from byte ``base``), its CRC
        checked; ``None`` where it is compressed, so it must be read."""
        stored = self._stored_record(key)
        if stored is None:
            return None
        info, start = stored
        data = map_bytes(path, base + start, info.file_size, self.what)
        if info.CRC and crc_of(data) != info.CRC:  # 0: torch wrote no CRC
            raise CorruptCheckpointError(f"{self.what} is corrupt: its record {info.filename} fails its CRC check.")
        return data

    def record_span(self, key: str, path: Path, base: int, what: str) -> Optional[FileSpan]:
        """Where the bytes of the record ``data/<key>`` lie in ``path`` (which
        holds this archive from byte ``base``), with the CRC they must pass;
        ``None`` where the record is compressed."""
        stored = self._stored_record(key)
        if stored is None:
            return None
        info, start = stored
        return FileSpan(str(path), base + start, info.file_size, info.CRC or None, None, what)  # CRC 0: torch wrote none

    def read(self, record: Record, meta: torch.Tensor) -> torch.Tensor:
        """Read the tensor that the placeholder ``meta``, on ``record``, stands for."""
        buffer = torch.empty(record.nbytes, dtype=torch.uint8)
        self.read_record_into(record.key, buffer)
        if self.byteorder not in (None, sys.byteorder):
            buffer.untyped_storage().byteswap(meta.dtype)  # type: ignore[no-untyped-call]
        if meta.numel() == 0:
            return torch.empty(meta.shape, dtype=meta.dtype)
        flat = buffer.view(meta.dtype)
        return torch.as_strided(flat, meta.shape, meta.stride(), meta.storage_offset()).contiguous()

    def check_all(self) -> None:
        """Read every record once, checking its CRC (what ``torch.load`` does not)."""
        for info in self.entries.values():
            self._read_whole(info)


def _data_start(file: Any, info: zipfile.ZipInfo) -> int:
    """Where the data of the entry ``info`` starts, after its local header
    (which must name the same entry)."""
    file.seek(info.header_offset)
    header = file.read(30)
    if len(header) != 30 or header[:4] != ZIP_MAGIC:
        raise zipfile.BadZipFile("no local header where the directory places it")
    name_length, extra_length = struct.unpack("<HH", header[26:30])
    if file.read(name_length) != info.orig_filename.encode("utf-8" if info.flag_bits & 0x800 else "cp437"):
        raise zipfile.BadZipFile("its local header names another entry")
    return int(info.header_offset + 30 + name_length + extra_length)


def _read_stored(file: Any, start: int, view: memoryview) -> int:
    file.seek(start)
    done = 0
    while done < len(view):
        got = file.readinto(view[done:])
        if not got:
            break
        done += got
    return done


def _inflate(file: Any, start: int, size: int, view: memoryview) -> int:
    """Inflate the ``size`` deflated bytes at ``start`` into ``view``; refuse more than it holds."""
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    file.seek(start)
    done, left, pending = 0, size, b""
    while not inflater.eof:
        if not pending:
            pending = file.read(min(_CHUNK, left)) if left else b""
            if not pending:
                break
            left -= len(pending)
        room = len(view) - done
        data = inflater.decompress(pending, room + 1)
        if len(data) > room:
            raise zipfile.BadZipFile(f"it inflates to more than the {len(view)} bytes it claims")
        pending = inflater.unconsumed_tail
        view[done : done + len(data)] = data
        done += len(data)
    return done


def _check_entries(infos: list[zipfile.ZipInfo], size: int, what: str) -> str:
    """Check a torch.save archive's directory; return the folder its records are in."""
    if not infos or "/" not in infos[0].filename:
        raise CorruptCheckpointError(f"{what} is corrupt: its zip archive holds no torch.save records.")
    names = collections.Counter(info.filename for info in infos)
    if len(names) != len(infos):
        dup = next(name for name, count in names.items() if count > 1)
        raise CorruptCheckpointError(f"{what} is corrupt: its zip archive holds {dup!r} twice.")
    ends: list[tuple[int, int, str]] = []
    for info in infos:
        problem = None
        if info.flag_bits & 0x1:
            problem = "is encrypted"
        elif info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
            problem = f"is compressed with method {info.compress_type}, which torch.load cannot read either"
        elif info.compress_type == zipfile.ZIP_STORED and info.compress_size != info.file_size:
            problem = f"is stored uncompressed but claims {info.file_size} bytes in {info.compress_size}"
        elif info.file_size > _DEFLATE_MAX_RATIO * info.compress_size + _DEFLATE_MAX_RATIO:
            problem = f"claims {info.file_size} bytes inflated from {info.compress_size}, more than deflate can give"
        if problem is not None:
            raise CorruptCheckpointError(f"{what} is corrupt: its record {info.filename!r} {problem}.")
        # the local header (30 bytes and the name) precedes the data
        ends.append((info.header_offset, info.header_offset + 30 + len(info.filename.encode()) + info.compress_size, info.filename))
    ends.sort()
    for (_, end, name), (start, _, _) in zip(ends, ends[1:] + [(size, 0, "")]):
        if end > start:
            raise CorruptCheckpointError(
                f"{what} is corrupt or truncated: its record {name!r} runs past "
                + ("the end of the file." if start == size else "the start of the next record.")
            )
    return infos[0].filename.split("/", 1)[0] + "/"


def _storage_claim(saved_id: Any, what: str) -> tuple[str, torch.dtype, int]:
    """``(record key, dtype, bytes)`` from a persistent id ``("storage", type, key, location, numel)``."""
    try:
        typename, storage_type, key, _, numel = saved_id
        dtype = torch.uint8 if storage_type is torch.UntypedStorage else storage_type.dtype
        ok = typename in ("storage", b"storage") and isinstance(dtype, torch.dtype) and type(numel) is int and numel >= 0
    except (TypeError, ValueError, AttributeError):
        ok = False
    if not ok:
        raise CorruptCheckpointError(
            f"{what} is corrupt: its pickle holds the storage reference {reprlib.repr(saved_id)}, "
            "not ('storage', type, key, location, size)."
        )
    return (key.decode() if isinstance(key, bytes) else str(key)), dtype, numel * dtype.itemsize


def _check_view(leaf: torch.Tensor, record: Record, key: str, what: str) -> None:
    """A placeholder's view must lie inside its record (torch checks this for
    real storages only, and grows a meta storage to fit)."""
    shape, stride, offset = tuple(leaf.shape), leaf.stride(), leaf.storage_offset()
    extent = offset + 1 + sum((n - 1) * s for n, s in zip(shape, stride)) if leaf.numel() else 0
    if offset < 0 or min(stride, default=0) < 0 or extent * leaf.element_size() > record.nbytes:
        raise CorruptCheckpointError(
            f"{what} is corrupt: {key!r} ({list(shape)}, strides {list(stride)}, offset {offset}, {leaf.dtype}) "
            f"spans more than its storage record's {record.nbytes} bytes."
        )


# -- writing ------------------------------------------------------------------


@attrs.frozen(eq=False)
class _Slot:
    """One stored tensor: the storage record ``key`` and the leaf to fetch."""

    key: str
    leaf: torch.Tensor
    where: str  # the first flat key that holds it, for errors


class _StorageRef:
    """Pickled as a persistent id: a reference to the record of ``slot``."""

    def __init__(self, slot: _Slot) -> None:
        self.slot = slot


class _SkeletonPickler(pickle.Pickler):
    """Pickle a tree whose tensors are :class:`_Slot` objects the way
    ``torch.save`` pickles tensors: ``_rebuild_tensor_v3`` over a storage
    record named by a persistent id."""

    def reducer_override(self, obj: Any) -> Any:
        if type(obj) is not _Slot:
            return NotImplemented
        leaf = obj.leaf
        shape = tuple(leaf.shape)
        hooks: collections.OrderedDict[Any, Any] = collections.OrderedDict()
        args = (_StorageRef(obj), 0, shape, contiguous_strides(shape), False, hooks, leaf.dtype)
        return (torch._utils._rebuild_tensor_v3, args)

    def persistent_id(self, obj: Any) -> Any:
        if type(obj) is _StorageRef:
            leaf = obj.slot.leaf
            return ("storage", torch.UntypedStorage, obj.slot.key, "cpu", leaf.numel() * leaf.element_size())
        if isinstance(obj, (torch.UntypedStorage, torch.storage.TypedStorage)):
            raise UnsupportedLeafError(
                "torch.save writer: the state dict holds a tensor inside an object sdtree cannot "
                f"walk into ({type(obj).__name__}). Keep tensors in dicts, lists and tuples."
            )
        return None


def _slots(tree: Any) -> tuple[Any, list[_Slot]]:
    """Replace each tensor leaf by its slot; one slot per distinct view of memory."""
    paths, leaves, spec = tree_flatten_with_path(tree)
    positions = [i for i, leaf in enumerate(leaves) if isinstance(leaf, torch.Tensor)]
    slots: list[_Slot] = []
    slot_of: list[_Slot] = []
    for n, first in enumerate(first_aliases([leaves[i] for i in positions])):
        if first == n:
            slots.append(_Slot(str(len(slots)), leaves[positions[n]], dotted(paths[positions[n]])))
        slot_of.append(slot_of[first] if first < n else slots[-1])
    for i, slot in zip(positions, slot_of):
        leaves[i] = slot
    return tree_unflatten(spec, leaves), slots


def write_torch_file(path: Path, tree: Any, fetch: Fetch, *, fn: str) -> None:
    """Write ``tree`` as a ``torch.save`` file at ``path``, fetching one tensor at a time."""
    skeleton, slots = _slots(tree)
    data = io.BytesIO()
    _SkeletonPickler(data, protocol=2).dump(skeleton)
    alignment = serialization_config.save.storage_alignment
    # The writer owns its file: if a fetch fails, it finishes the archive
    # whenever it is collected, never into a file closed under it.
    writer = torch._C.PyTorchFileWriter(str(path), torch.serialization.get_crc32_options(), alignment)
    _write_records(writer, data.getvalue(), alignment, slots, fetch, fn)
    del writer


def _write_records(writer: Any, pickled: bytes, alignment: int, slots: list[_Slot], fetch: Fetch, fn: str) -> None:
    """The records of ``torch.save``'s format: the pickle, format markers, then one per storage."""
    for name, record in (
        ("data.pkl", pickled),
        (".format_version", b"1"),
        (".storage_alignment", str(alignment).encode()),
        ("byteorder", sys.byteorder.encode()),
    ):
        writer.write_record(name, record, len(record))
    for slot in slots:
        tensor = fetched_plain(fetch(slot.leaf), slot.leaf, slot.where, fn)
        # torch.save passes the storage itself too (no copy); the stubs miss that overload
        writer.write_record(f"data/{slot.key}", tensor.untyped_storage(), tensor.nbytes)
        del tensor
    writer.write_end_of_file()
