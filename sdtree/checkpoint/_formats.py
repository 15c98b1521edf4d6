"""Tell a checkpoint's format from its path and first bytes.

- ``"dcp"``: a ``torch.distributed.checkpoint`` directory (it holds ``.metadata``);
- ``"torch"``: a ``torch.save`` file (a zip archive, or the legacy pickle format);
- ``"safetensors"``: a safetensors file (an 8-byte little-endian header size,
  then a JSON header that starts with ``{``);
- ``"hf"``: a Hugging Face directory, as ``save_pretrained`` writes it: an
  index (``model.safetensors.index.json``, or ``pytorch_model.bin.index.json``)
  and the shards it names, or a single ``model.safetensors`` (``pytorch_model.bin``).
"""

from __future__ import annotations

import os
import re
import stat
from pathlib import Path
from typing import Literal, Optional, Union

import attrs

from sdtree.errors import CheckpointFormatError, CheckpointNotFoundError, preview as _preview

__all__ = ["Format", "FORMATS", "PathLike", "HfLayout", "HF_LAYOUTS", "DCP_METADATA", "ZIP_MAGIC", "detect_format", "hf_layout", "destination_format"]

Format = Literal["dcp", "torch", "safetensors", "hf"]
FORMATS: tuple[Format, ...] = ("dcp", "torch", "safetensors", "hf")
PathLike = Union[str, "os.PathLike[str]"]

DCP_METADATA = ".metadata"
ZIP_MAGIC = b"PK\x03\x04"
_PICKLE_PROTO_2 = b"\x80\x02"  # torch.save's legacy format starts with a protocol-2 pickle
_TORCH_SUFFIXES = {".pt", ".pth", ".bin", ".ckpt", ".tar", ".pkl", ".torch"}
_SAFETENSORS_SUFFIX = ".safetensors"


@attrs.frozen
class HfLayout:
    """The file names of one kind of Hugging Face directory.

    Attributes:
        index: the index file, ``{"metadata": ..., "weight_map": {key: shard}}``.
        single: the one file of a checkpoint too small to shard (no index).
        shard: how ``save_pretrained`` names the shards (``model-00001-of-00004.safetensors``).
        kind: the format of each shard file.
    """

    index: str
    single: str
    shard: re.Pattern[str]
    kind: Format


HF_LAYOUTS = (  # in the order transformers prefers them
    HfLayout(
        "model.safetensors.index.json", "model.safetensors", re.compile(r"model-\d{5}-of-\d{5}\.safetensors"), "safetensors"
    ),
    HfLayout("pytorch_model.bin.index.json", "pytorch_model.bin", re.compile(r"pytorch_model-\d{5}-of-\d{5}\.bin"), "torch"),
)


def detect_format(path: PathLike) -> Format:
    """Return the format of the checkpoint at ``path``, read from what is there.

    A directory is a DCP checkpoint when it holds ``.metadata``, and a
    Hugging Face one when it holds an index or a single weights file
    (:func:`hf_layout`); a file is told by its first bytes, whatever its name.

    Raises:
        CheckpointNotFoundError: nothing is at ``path``.
        CheckpointFormatError: ``path`` holds no format sdtree reads.
    """
    path = Path(path)
    if path.is_dir():
        if (path / DCP_METADATA).is_file():
            return "dcp"
        if hf_layout(path) is not None:
            return "hf"
        shards = sorted(name for name in os.listdir(path) if any(layout.shard.fullmatch(name) for layout in HF_LAYOUTS))
        found = (
            f" It holds shards named as Hugging Face names them ({_preview(shards)}) but not their "
            f"index: copy {' or '.join(repr(layout.index) for layout in HF_LAYOUTS)} with them."
            if shards else ""
        )
        raise CheckpointFormatError(
            f"{str(path)!r} is a directory without a {DCP_METADATA!r} file, so it is not a "
            "torch.distributed.checkpoint (DCP) checkpoint, nor a Hugging Face one (it holds no "
            f"{_preview(name for layout in HF_LAYOUTS for name in (layout.index, layout.single))}).{found} "
            "Pass the checkpoint directory itself, or a torch.save or safetensors file."
        )
    try:
        info = path.stat()
    except FileNotFoundError:
        raise CheckpointNotFoundError(f"no checkpoint at {str(path)!r}: the path does not exist.") from None
    if not stat.S_ISREG(info.st_mode):  # opening a named pipe would wait for a writer
        raise CheckpointFormatError(
            f"{str(path)!r} is not a checkpoint: it is {_KINDS.get(stat.S_IFMT(info.st_mode), 'not a regular file')}. "
            "Pass a torch.save or safetensors file, or a DCP directory holding '.metadata'."
        )
    size = info.st_size
    with open(path, "rb") as file:
        head = file.read(16)
    if head.startswith(ZIP_MAGIC) or head.startswith(_PICKLE_PROTO_2):
        return "torch"
    if _is_safetensors_head(head):
        return "safetensors"
    what = "is empty" if size == 0 else f"starts with {head[:8]!r}"
    raise CheckpointFormatError(
        f"{str(path)!r} is not a checkpoint sdtree knows: the file {what}. Expected a "
        f"torch.save file (a zip archive, {ZIP_MAGIC!r}), a safetensors file (an 8-byte "
        "header size, then '{'), or a DCP directory holding '.metadata'."
    )


_KINDS = {
    stat.S_IFIFO: "a named pipe",
    stat.S_IFSOCK: "a socket",
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
}


def hf_layout(directory: Path) -> HfLayout | None:
    """The layout of the Hugging Face checkpoint in ``directory``, if it holds
    one: its index, else its single weights file, safetensors before ``.bin``
    (as transformers prefers them).

    Raises:
        CheckpointFormatError: it holds both the index and the single file of
            one layout: one of them is left from an earlier save, and
            transformers would read the single file.
    """
    for layout in HF_LAYOUTS:
        index, single = (os.path.lexists(directory / name) for name in (layout.index, layout.single))
        if index and single:
            raise CheckpointFormatError(
                f"{str(directory)!r} holds both {layout.index!r} and {layout.single!r}, two Hugging Face "
                f"checkpoints (one left from an earlier save; transformers reads {layout.single!r}). "
                "Remove the stale one (the older file), then read the directory again."
            )
        if index or single:
            return layout
    return None


def _is_safetensors_head(head: bytes) -> bool:
    """An 8-byte header size, then ``{``: the header may run past the end of a
    truncated file, which the reader then reports."""
    return len(head) >= 9 and int.from_bytes(head[:8], "little") >= 2 and head[8:9] == b"{"


def destination_format(path: PathLike, to: Optional[str] = None) -> Format:
    """Return the format to write at ``path``: ``to`` when given, else from the name.

    ``*.safetensors`` is safetensors; ``*.pt``, ``.pth``, ``.bin``, ``.ckpt``,
    ``.tar``, ``.pkl`` and ``.torch`` are torch.save files; an existing directory,
    a path ending in a separator or a name without a suffix is a DCP directory.
    A Hugging Face directory is written only when asked for (``to="hf"``).

    >>> destination_format("model.safetensors"), destination_format("step-100"), destination_format("m.pt", to="dcp")
    ('safetensors', 'dcp', 'dcp')

    Raises:
        CheckpointFormatError: ``to`` is not a format, or the name does not tell.
    """
    if to is not None:
        if to not in FORMATS:
            raise CheckpointFormatError(
                f"unknown checkpoint format to={to!r}: expected one of {', '.join(map(repr, FORMATS))}."
            )
        return to
    text = os.fspath(path)
    path = Path(text)
    suffix = path.suffix.lower()
    if suffix == _SAFETENSORS_SUFFIX:
        return "safetensors"
    if suffix in _TORCH_SUFFIXES:
        return "torch"
    if path.is_dir() or text.endswith(("/", os.sep)) or not suffix:
        return "dcp"
    raise CheckpointFormatError(
        f"cannot tell which format to write at {text!r} from its suffix {suffix!r}: name it "
        f"*.safetensors, *.pt (torch.save) or give no suffix (a DCP directory), or pass "
        "to='dcp' | 'torch' | 'safetensors' | 'hf' (--to on the command line)."
    )
