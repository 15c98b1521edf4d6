"""Conversions copy tensors stored as they are written with the kernel
(copy_file_range), never reading them into the process; DCP records are
written as torch.save writes them, their CRCs computed or checked beside the copy."""

import errno
import io
import os
import zipfile
import zlib

import pytest
import torch
import torch.distributed.checkpoint as dcp
from safetensors import safe_open

from sdtree.checkpoint import Checkpoint, convert, load, open_checkpoint, save
from sdtree.checkpoint._dcp_write import write_tensor_archive
from sdtree.checkpoint._spans import FileSpan, copy_span
from sdtree.checkpoint._torch_file import TorchArchive
from sdtree.errors import CorruptCheckpointError
from sdtree.testing import assert_state_dict_equal

MIB = 1 << 20
SOURCES = {"safetensors": "src.safetensors", "hf": "src-hf", "dcp": "src-dcp"}
DESTINATIONS = {"dcp": "out", "safetensors": "out.safetensors", "hf": "out-hf"}


def _model():
    g = torch.Generator().manual_seed(0)
    return {  # 1 MiB and more: a DCP record gives a span from that size on
        "a": torch.randn(512, 512, generator=g),
        "b": torch.randn(512, 1024, generator=g).to(torch.bfloat16),
        "c": torch.randint(-5, 5, (1024, 256), generator=g),
    }


def _source(tmp_path, fmt, model=None):
    path = tmp_path / SOURCES[fmt]
    save(_model() if model is None else model, path, format=fmt, **({"max_shard_size": 2 * MIB} if fmt == "hf" else {}))
    return path


def _counting(monkeypatch):
    """Count what a conversion reads (borrows) and what it copies as spans."""
    reads, spans = [], []
    borrow, span = Checkpoint.borrow, Checkpoint.span
    monkeypatch.setattr(Checkpoint, "borrow", lambda self, t: reads.append(t) or borrow(self, t))
    monkeypatch.setattr(Checkpoint, "span", lambda self, t: (found := span(self, t)) and (spans.append(t) or found))
    return reads, spans


@pytest.mark.parametrize("dst_fmt", sorted(DESTINATIONS))
@pytest.mark.parametrize("src_fmt", sorted(SOURCES))
def test_tensors_stored_as_written_are_copied_by_the_kernel_not_read(tmp_path, monkeypatch, src_fmt, dst_fmt):
    src = _source(tmp_path, src_fmt)
    reads, spans = _counting(monkeypatch)
    dst = tmp_path / DESTINATIONS[dst_fmt]
    convert(src, dst, to=dst_fmt)
    assert reads == [] and len({id(t) for t in spans}) == 3  # (a directory's span asks its shard's too)
    monkeypatch.undo()
    assert_state_dict_equal(load(dst), _model())
    if dst_fmt == "dcp":  # torch reads what sdtree wrote
        into = {k: torch.empty_like(v) for k, v in _model().items()}
        with pytest.warns(UserWarning, match="torch.distributed is disabled"):  # torch's, run without a process group
            dcp.load(into, checkpoint_id=dst)
        assert_state_dict_equal(into, _model())
    if dst_fmt == "safetensors":
        with safe_open(str(dst), framework="pt") as file:
            assert_state_dict_equal({k: file.get_tensor(k) for k in file.keys()}, _model())


@pytest.mark.parametrize(
    "tensor",
    [torch.arange(12, dtype=torch.float32).view(3, 4), torch.ones(5, dtype=torch.bfloat16), torch.tensor(7),
     torch.tensor([True, False, True]), torch.arange(6, dtype=torch.float16).view(1, 2, 3)],
    ids=["float32", "bfloat16", "scalar", "bool", "float16-3d"],
)
@pytest.mark.parametrize("source", ["span", "memory"])
def test_a_tensor_archive_is_what_torch_save_writes(tmp_path, tensor, source):
    src = tmp_path / "bytes"
    src.write_bytes(b"junk" + tensor.reshape(-1).view(torch.uint8).numpy().tobytes() + b"tail")
    data = FileSpan(str(src), 4, tensor.numel() * tensor.element_size(), None, None, "t") if source == "span" else (lambda: tensor)
    with open(tmp_path / "data.distcp", "wb") as out:
        out.write(b"x" * 7)  # appended after other bytes, as in a .distcp file
        write_tensor_archive(out, torch.empty(tensor.shape, dtype=tensor.dtype, device="meta"), [data], "t")
    blob = (tmp_path / "data.distcp").read_bytes()[7:]
    loaded = torch.load(io.BytesIO(blob), weights_only=True)
    assert loaded.dtype == tensor.dtype and torch.equal(loaded, tensor)
    with zipfile.ZipFile(io.BytesIO(blob)) as archive:
        assert archive.testzip() is None  # every CRC right
        reference = zipfile.ZipFile(io.BytesIO(_torch_save(tensor)))
        assert [i.filename for i in archive.infolist()] == [i.filename for i in reference.infolist()]
        for info in archive.infolist():  # each record's data at a multiple of 64, as torch aligns it
            name, extra = (int.from_bytes(blob[info.header_offset + k : info.header_offset + k + 2], "little") for k in (26, 28))
            assert (info.header_offset + 30 + name + extra) % 64 == 0, info.filename
    path = tmp_path / "archive.pt"
    path.write_bytes(blob)
    assert torch.equal(torch.load(path, weights_only=True, mmap=True), tensor)  # aligned for a mapped load
    opened = TorchArchive.open(path, len(blob), "archive")
    opened.check_all()
    assert torch.equal(opened.read(TorchArchive.record_of(opened.skeleton(trust_pickle=False)), opened.skeleton(trust_pickle=False)), tensor)


def _torch_save(tensor):
    buffer = io.BytesIO()
    torch.save(tensor, buffer)
    return buffer.getvalue()


def _span(tmp_path, data=b"0123456789" * 1000, **kw):
    path = tmp_path / "src.bin"
    path.write_bytes(data)
    fields = {"path": str(path), "offset": 10, "nbytes": len(data) - 20, "crc": None, "identity": None, "what": "'w'", **kw}
    return path, FileSpan(**fields)


def test_copy_span_appends_the_bytes_and_sums_them(tmp_path):
    path, span = _span(tmp_path)
    out_path = tmp_path / "out.bin"
    with open(out_path, "wb") as out:
        out.write(b"head")
        assert copy_span(span, out, crc=True) == zlib.crc32(path.read_bytes()[10:-10])
        assert out.tell() == 4 + span.nbytes
        out.write(b"end")
    assert out_path.read_bytes() == b"head" + path.read_bytes()[10:-10] + b"end"


def test_copy_span_copies_through_a_buffer_where_the_kernel_cannot(tmp_path, monkeypatch):
    path, span = _span(tmp_path, os.urandom(3 * MIB))

    def refuse(*args):
        raise OSError(errno.EXDEV, "cross-device")

    monkeypatch.setattr(os, "copy_file_range", refuse)
    with open(tmp_path / "out.bin", "wb") as out:
        copy_span(span, out, crc=False)
    assert (tmp_path / "out.bin").read_bytes() == path.read_bytes()[10:-10]


def test_copy_span_refuses_bytes_that_fail_their_crc_or_are_gone(tmp_path):
    path, span = _span(tmp_path, crc=12345)
    with open(tmp_path / "out.bin", "wb") as out, pytest.raises(
        CorruptCheckpointError, match=r"^'w' is corrupt: its record at bytes \[10, 9990\) of '.*src\.bin' fails its CRC check\.$"
    ):
        copy_span(span, out, crc=False)
    path.write_bytes(b"short")
    with open(tmp_path / "out.bin", "wb") as out, pytest.raises(
        CorruptCheckpointError, match=r"^'w': the file '.*src\.bin' is 5 bytes, too short for bytes \[10, 9990\) \(truncated since it was opened\?\)\.$"
    ):
        copy_span(span._replace(crc=None), out, crc=False)


def test_a_source_replaced_after_it_was_opened_is_not_copied(tmp_path):
    src = _source(tmp_path, "safetensors")
    checkpoint = open_checkpoint(src)
    span = checkpoint.span(checkpoint.tree["a"])
    save({**_model(), "a": torch.zeros(512, 512)}, tmp_path / "other.safetensors")
    os.replace(tmp_path / "other.safetensors", src)
    with open(tmp_path / "out.bin", "wb") as out, pytest.raises(
        CorruptCheckpointError, match=r"src\.safetensors.* has changed since the checkpoint was opened"
    ):
        copy_span(span, out, crc=False)


@pytest.mark.parametrize("dst_fmt", sorted(DESTINATIONS))
def test_a_corrupt_dcp_record_fails_the_conversion_and_leaves_nothing(tmp_path, dst_fmt):
    model = {"w": torch.full((512, 512), 1.5), "x": torch.ones(3)}
    src = _source(tmp_path, "dcp", model)
    (data,) = [p for p in src.iterdir() if p.suffix == ".distcp"]
    raw = bytearray(data.read_bytes())
    raw[raw.find(torch.full((64,), 1.5).numpy().tobytes()) + 4096] ^= 0xFF  # inside w's bytes
    data.write_bytes(bytes(raw))
    opened = open_checkpoint(src)
    assert opened.span(opened.tree["w"]) is not None  # w is copied, not read
    dst = tmp_path / DESTINATIONS[dst_fmt]
    with pytest.raises(CorruptCheckpointError, match=r"src-dcp': 'w' is corrupt: its record .* fails its CRC check"):
        convert(src, dst, to=dst_fmt)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src-dcp"]


def test_only_whole_plain_tensors_have_spans(tmp_path):
    small = {"big": torch.ones(512, 512), "small": torch.ones(4)}
    dcp_src = _source(tmp_path, "dcp", small)
    checkpoint = open_checkpoint(dcp_src)
    assert checkpoint.span(checkpoint.tree["big"]).nbytes == MIB
    assert checkpoint.span(checkpoint.tree["small"]) is None  # below 1 MiB a DCP tensor is read
    st = open_checkpoint(_source(tmp_path, "safetensors", small))
    assert st.span(st.tree["small"]).nbytes == 16 and st.span(torch.ones(2)) is None  # not a placeholder


@pytest.mark.parametrize("dst_fmt", sorted(DESTINATIONS))
@pytest.mark.parametrize("src_fmt", sorted(SOURCES))
def test_a_fuse_along_dim_0_is_written_from_its_parts_bytes(tmp_path, monkeypatch, src_fmt, dst_fmt):
    from sdtree.transforms import fuse, permute_for_rope

    g = torch.Generator().manual_seed(1)
    model = {f"l.{i}.{n}": torch.randn(512, 512, generator=g) for i in range(2) for n in ("q", "k", "v")}
    src = _source(tmp_path, src_fmt, model)
    rule = permute_for_rope("l.{i}.q", n_heads=8) >> fuse(["l.{i}.q", "l.{i}.k", "l.{i}.v"], "l.{i}.qkv", sizes=(512, 512, 512))
    reads, spans = _counting(monkeypatch)
    dst = tmp_path / DESTINATIONS[dst_fmt]
    # one permuted q at a time (and the q it is permuted from, where it is read rather than mapped: DCP)
    assert convert(src, dst, transform=rule, to=dst_fmt, dry_run=True).peak_bytes == (2 if src_fmt == "dcp" else 1) * MIB
    convert(src, dst, transform=rule, to=dst_fmt)
    # each q read (to permute it); each k and v copied by the kernel into the fused output, which is never built
    assert len({id(t) for t in reads}) == 2 and len({id(t) for t in spans}) == 4
    monkeypatch.undo()
    assert_state_dict_equal(load(dst), rule(model))  # sdtree's reader checks each DCP record's CRC
    if dst_fmt == "dcp":
        into = {k: torch.empty_like(v) for k, v in rule(model).items()}
        with pytest.warns(UserWarning, match="torch.distributed is disabled"):
            dcp.load(into, checkpoint_id=dst)
        assert_state_dict_equal(into, rule(model))


def test_a_corrupt_part_of_a_fuse_fails_the_conversion(tmp_path):
    from sdtree.transforms import fuse

    model = {"a": torch.zeros(512, 512), "b": torch.full((512, 512), 1.5)}
    src = _source(tmp_path, "dcp", model)
    (data,) = [p for p in src.iterdir() if p.suffix == ".distcp"]
    raw = bytearray(data.read_bytes())
    raw[raw.find(torch.full((64,), 1.5).numpy().tobytes()) + 4096] ^= 0xFF  # inside b, the second part
    data.write_bytes(bytes(raw))
    with pytest.raises(CorruptCheckpointError, match=r"src-dcp': 'b' is corrupt: its record .* fails its CRC check"):
        convert(src, tmp_path / "out", transform=fuse(["a", "b"], "ab"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src-dcp"]


@pytest.mark.parametrize("dst_fmt", sorted(DESTINATIONS))
@pytest.mark.parametrize("sync", [True, False])
def test_a_durable_write_starts_each_tensors_writeback_as_it_is_written(tmp_path, monkeypatch, dst_fmt, sync):
    import sdtree.checkpoint._dcp_write as dcp_write
    import sdtree.checkpoint._safetensors as safetensors_write

    src = _source(tmp_path, "safetensors")
    calls = []
    for module in (dcp_write, safetensors_write):
        monkeypatch.setattr(module, "start_writeback", lambda file, offset: calls.append((offset, file.tell() - offset)))
    convert(src, tmp_path / DESTINATIONS[dst_fmt], to=dst_fmt, sync=sync)
    if not sync:
        assert calls == []
        return
    sizes = sorted(n for _, n in calls)
    assert len(calls) >= 3 and all(n > 0 for n in sizes)
    assert sum(n for _, n in calls) >= sum(t.numel() * t.element_size() for t in _model().values())


def test_start_writeback_leaves_a_failure_to_the_fsync(tmp_path):
    from sdtree.checkpoint._atomic import start_writeback

    with open(tmp_path / "f", "wb") as file:
        file.write(b"x" * 10000)
        start_writeback(file, 0)  # flushes what the file object buffers first
        assert os.path.getsize(tmp_path / "f") == 10000

    class BadDescriptor(io.BytesIO):
        def fileno(self):
            return -1

    bad = BadDescriptor(b"y" * 10)
    bad.seek(10)
    start_writeback(bad, 0)  # a bad descriptor: nothing raised, the fsync that follows reports what is wrong


def test_copy_span_works_where_the_system_has_no_copy_file_range_or_preadv(tmp_path, monkeypatch):
    import sdtree.checkpoint._spans as spans

    path, span = _span(tmp_path, os.urandom(5 * MIB + 3), crc=None)
    monkeypatch.setattr(spans, "_COPY_FILE_RANGE", None)  # as on macOS
    monkeypatch.delattr(os, "preadv")
    with open(tmp_path / "out.bin", "wb") as out:
        summed = copy_span(span, out, crc=True)
    assert (tmp_path / "out.bin").read_bytes() == path.read_bytes()[10:-10]
    assert summed == zlib.crc32(path.read_bytes()[10:-10])
