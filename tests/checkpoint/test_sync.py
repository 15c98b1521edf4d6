"""Saves and conversions flush what they write to the disk (fsync) before
renaming it into place, unless told not to (sync=False, --no-sync)."""

import os

import pytest
import torch

from sdtree.checkpoint import convert, load, save
from sdtree.testing import assert_state_dict_equal

DESTINATIONS = {"dcp": "out", "torch": "out.pt", "safetensors": "out.safetensors", "hf": "out-hf"}


def _model():
    return {"a": torch.randn(64, 64), "b": torch.arange(10)}


def _source(tmp_path):
    save(_model(), tmp_path / "src.safetensors")
    return tmp_path / "src.safetensors"


def _files(path):
    return sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]


def _fsynced(monkeypatch):
    synced = []
    fsync = os.fsync

    def recording_fsync(fd):
        synced.append(os.path.basename(os.readlink(f"/proc/self/fd/{fd}")))
        fsync(fd)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    return synced


@pytest.mark.parametrize("dst_fmt", sorted(DESTINATIONS))
def test_a_conversion_flushes_every_file_and_directory_it_writes(tmp_path, monkeypatch, dst_fmt):
    src = _source(tmp_path)
    synced = _fsynced(monkeypatch)
    dst = tmp_path / "dst" / DESTINATIONS[dst_fmt]
    convert(src, dst, to=dst_fmt)
    temporary = [name for name in synced if name.startswith(f".{dst.name}.sdtree-tmp-")]
    assert len(set(temporary)) == 1  # the file, or the directory, under its name before the rename
    if dst.is_dir():
        assert {p.name for p in _files(dst)} <= set(synced)  # every file in it
    assert synced[-1] == "dst"  # then the directory that holds the renamed destination


@pytest.mark.parametrize("dst_fmt", sorted(DESTINATIONS))
def test_sync_false_flushes_nothing(tmp_path, monkeypatch, dst_fmt):
    src = _source(tmp_path)
    synced = _fsynced(monkeypatch)
    convert(src, tmp_path / DESTINATIONS[dst_fmt], to=dst_fmt, sync=False)
    save(_model(), tmp_path / ("saved-" + DESTINATIONS[dst_fmt]), format=dst_fmt, sync=False)
    assert synced == []
    assert_state_dict_equal(load(tmp_path / DESTINATIONS[dst_fmt]), load(src))
