"""Conversions borrow the source's tensors: views of its files mapped
copy-on-write, never written, let go when the conversion ends."""

import hashlib
import os
import threading
import time

import pytest
import torch

from sdtree.checkpoint import convert, load, open_checkpoint, save
from sdtree.errors import CorruptCheckpointError
from sdtree.testing import assert_state_dict_equal
from sdtree.transforms import fuse

MIB = 1 << 20
SOURCES = {"safetensors": "src.safetensors", "hf": "src-hf", "dcp": "src-dcp"}
DESTINATIONS = {"dcp": "out", "torch": "out.pt", "safetensors": "out.safetensors", "hf": "out-hf"}


def _model():
    g = torch.Generator().manual_seed(0)
    # 1 MiB and more: a DCP tensor is mapped from that size on; the small ones are read
    return {
        "a": torch.randn(512, 512, generator=g),
        "b": torch.randn(512, 1024, generator=g).to(torch.bfloat16),
        "small": torch.arange(10),
        "c": torch.randn(600, 512, generator=g),
    }


def _source(tmp_path, fmt, model=None):
    path = tmp_path / SOURCES[fmt]
    save(_model() if model is None else model, path, format=fmt, **({"max_shard_size": 2 * MIB} if fmt == "hf" else {}))
    return path


def _files(path):
    return sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]


def _digest(path):
    return {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in _files(path)}


def _mapped_paths():
    with open("/proc/self/maps") as maps:
        return {line.split(maxsplit=5)[5].strip() for line in maps if len(line.split(maxsplit=5)) == 6}


def _open_paths():
    paths = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            paths.add(os.readlink(f"/proc/self/fd/{fd}"))
        except OSError:
            pass
    return paths


def _in_a_mapping_of(tensor, files):
    """Whether ``tensor``'s data lies in a mapping of one of ``files``."""
    names = {str(f) for f in files}
    address = tensor.data_ptr()
    with open("/proc/self/maps") as maps:
        for line in maps:
            parts = line.split(maxsplit=5)
            start, end = (int(x, 16) for x in parts[0].split("-"))
            if start <= address < end:
                return len(parts) == 6 and parts[5].strip() in names
    return False


@pytest.mark.parametrize("src_fmt", sorted(SOURCES))
def test_borrow_maps_large_plain_tensors_and_reads_the_rest(tmp_path, src_fmt):
    src = _source(tmp_path, src_fmt)
    checkpoint = open_checkpoint(src)
    files = _files(src)
    for key, leaf in checkpoint.tree.items():
        borrowed = checkpoint.borrow(leaf)
        assert torch.equal(borrowed, checkpoint.fetch(leaf)) and borrowed.dtype == leaf.dtype
        mapped = src_fmt != "dcp" or key != "small"  # DCP maps single chunks of 1 MiB or more
        assert _in_a_mapping_of(borrowed, files) == mapped, key
        assert checkpoint.is_mapped(leaf) == (src_fmt != "dcp")  # a DCP tensor's record decides, when read
        assert not _in_a_mapping_of(checkpoint.fetch(leaf), files)  # fetch copies


@pytest.mark.parametrize("src_fmt", sorted(SOURCES))
def test_writing_into_a_borrowed_tensor_never_reaches_the_file(tmp_path, src_fmt):
    src = _source(tmp_path, src_fmt)
    before = _digest(src)
    checkpoint = open_checkpoint(src)
    leaf = checkpoint.tree["a"]
    borrowed = checkpoint.borrow(leaf)
    borrowed.add_(1)
    assert _digest(src) == before
    assert torch.equal(checkpoint.borrow(leaf), _model()["a"]) and torch.equal(checkpoint.fetch(leaf), _model()["a"])


@pytest.mark.parametrize("dst_fmt", sorted(DESTINATIONS))
@pytest.mark.parametrize("src_fmt", sorted(SOURCES))
def test_a_conversion_from_mapped_tensors_writes_their_values_and_lets_the_files_go(tmp_path, src_fmt, dst_fmt):
    src = _source(tmp_path, src_fmt)
    before = _digest(src)
    dst = tmp_path / DESTINATIONS[dst_fmt]
    rule = fuse(["a", "c"], "ac")  # one output computed from two mapped sources, the rest copied
    convert(src, dst, transform=rule, to=dst_fmt)
    assert_state_dict_equal(load(dst), rule(_model()))
    assert _digest(src) == before
    names = {str(f) for f in _files(src)}
    assert not names & _mapped_paths(), "a borrowed tensor outlived the conversion"
    assert not names & _open_paths()


def test_a_mapped_dcp_record_is_still_checked_against_its_crc(tmp_path):
    model = {"w": torch.full((512, 512), 1.5), "x": torch.ones(3)}
    src = _source(tmp_path, "dcp", model)
    (data,) = [p for p in _files(src) if p.suffix == ".distcp"]
    raw = bytearray(data.read_bytes())
    at = raw.find(torch.full((64,), 1.5).numpy().tobytes()) + 4096  # inside w's bytes
    raw[at] ^= 0xFF
    data.write_bytes(bytes(raw))
    with pytest.raises(CorruptCheckpointError, match=r"src-dcp': 'w' is corrupt: its record .* fails its CRC check"):
        convert(src, tmp_path / "out.safetensors")
    assert not (tmp_path / "out.safetensors").exists()


def test_a_source_changed_after_it_was_opened_is_not_borrowed(tmp_path):
    src = _source(tmp_path, "safetensors")
    checkpoint = open_checkpoint(src)
    save({**_model(), "a": torch.zeros(512, 512)}, tmp_path / "other.safetensors")
    os.replace(tmp_path / "other.safetensors", src)
    with pytest.raises(CorruptCheckpointError, match=r"src\.safetensors.* has changed since the checkpoint was opened"):
        checkpoint.borrow(checkpoint.tree["a"])


def _rss_anon():
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no RssAnon in /proc/self/status")


def _peak_anon_during(fn):
    """The most anonymous memory above what it was before, sampled while ``fn`` runs."""
    base = _rss_anon()
    peak = [base]
    done = threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], _rss_anon())
            time.sleep(0.0005)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        out = fn()
    finally:
        done.set()
        sampler.join()
    return out, peak[0] - base


def test_the_planned_peak_bounds_the_memory_a_conversion_holds(tmp_path):
    # 40 MiB tensors: glibc maps allocations this large on their own (above its
    # 32 MiB top threshold), so freeing one shows at once in RssAnon
    g = torch.Generator().manual_seed(0)
    model = {f"l.{i}.{n}": torch.randn(2560, 4096, generator=g) for i in range(2) for n in ("gate", "up")}
    src = tmp_path / "src.safetensors"
    save(model, src)
    rule = fuse(["l.{i}.gate", "l.{i}.up"], "l.{i}.w13", dim=1)  # along dim 1: the output must be computed
    plan = convert(src, tmp_path / "plan", transform=rule, to="hf", dry_run=True)
    assert plan.peak_bytes == 80 * MIB  # the fused output; its sources are mapped
    done, peak = _peak_anon_during(lambda: convert(src, tmp_path / "out", transform=rule, to="hf", sync=False))
    assert done.peak_bytes == plan.peak_bytes
    assert peak <= plan.peak_bytes + 8 * MIB, f"held {peak / MIB:.0f} MiB, planned {plan.peak_bytes / MIB:.0f}"
    assert peak >= plan.peak_bytes / 2  # the measure sees the fused output: it does measure
    _, copied = _peak_anon_during(lambda: convert(src, tmp_path / "copy", to="hf", sync=False))
    assert copied <= 8 * MIB  # every tensor copied from the file
    # along dim 0 the output's bytes are its sources', one after another: copied from the file, never held
    stacked = fuse(["l.{i}.gate", "l.{i}.up"], "l.{i}.w13")
    plan = convert(src, tmp_path / "plan0", transform=stacked, to="hf", dry_run=True)
    assert plan.peak_bytes == 0
    done, held = _peak_anon_during(lambda: convert(src, tmp_path / "out0", transform=stacked, to="hf", sync=False))
    assert held <= 8 * MIB, f"held {held / MIB:.0f} MiB"
    assert_state_dict_equal(load(tmp_path / "out0"), stacked(model))
    on_torch = convert(src, tmp_path / "plan.pt", transform=stacked, dry_run=True)
    assert on_torch.peak_bytes == 80 * MIB  # a torch.save file is written whole: the output is computed
