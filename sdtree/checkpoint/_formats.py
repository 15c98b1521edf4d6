"""Tell a checkpoint's format from its path and first bytes.

- ``"dcp"``: a ``torch.distributed.checkpoint`` directory (it holds ``.metadata``);
- ``"torch"``: a ``torch.save`` file (a zip archive, or the legacy pickle format);
- ``"safetensors"``: a safetensors file (an 8-byte little-endian header size,
  then a JSON header that starts with ``{``).
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Literal, Optional, Union

from sdtree.errors import CheckpointFormatError, CheckpointNotFoundError

__all__ = ["Format", "FORMATS", "PathLike", "detect_format", "destination_format"]

Format = Literal["dcp", "torch", "safetensors"]
FORMATS: tuple[Format, ...] = ("dcp", "torch", "safetensors")
PathLike = Union[str, "os.PathLike[str]"]

DCP_METADATA = ".metadata"
ZIP_MAGIC = b"PK\x03\x04"
_PICKLE_PROTO_2 = b"\x80\x02"  # torch.save's legacy format starts with a protocol-2 pickle
_TORCH_SUFFIXES = {".pt", ".pth", ".bin", ".ckpt", ".tar", ".pkl", ".torch"}
_SAFETENSORS_SUFFIX = ".safetensors"


def detect_format(path: PathLike) -> Format:
    """Return the format of the checkpoint at ``path``, read from what is there.

    A directory is a DCP checkpoint when it holds ``.metadata``; a file is
    told by its first bytes, whatever its name.

    Raises:
        CheckpointNotFoundError: nothing is at ``path``.
        CheckpointFormatError: ``path`` holds no format sdtree reads.
    """
    path = Path(path)
    if path.is_dir():
        if (path / DCP_METADATA).is_file():
            return "dcp"
        raise CheckpointFormatError(
            f"{str(path)!r} is a directory without a {DCP_METADATA!r} file, so it is not a "
            "torch.distributed.checkpoint (DCP) checkpoint. Pass the checkpoint directory "
            "itself, or a torch.save or safetensors file."
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


def _is_safetensors_head(head: bytes) -> bool:
    """An 8-byte header size, then ``{``: the header may run past the end of a
    truncated file, which the reader then reports."""
    return len(head) >= 9 and int.from_bytes(head[:8], "little") >= 2 and head[8:9] == b"{"


def destination_format(path: PathLike, to: Optional[str] = None) -> Format:
    """Return the format to write at ``path``: ``to`` when given, else from the name.

    ``*.safetensors`` is safetensors; ``*.pt``, ``.pth``, ``.bin``, ``.ckpt``,
    ``.tar``, ``.pkl`` and ``.torch`` are torch.save files; an existing directory,
    a path ending in a separator or a name without a suffix is a DCP directory.

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
        "to='dcp' | 'torch' | 'safetensors' (--to on the command line)."
    )
