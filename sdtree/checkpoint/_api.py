"""Open, save, load and convert checkpoints in any of the three formats."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Optional

import attrs
import torch

from sdtree._tree import tree_flatten
from sdtree.checkpoint._atomic import atomic_destination, check_destination, check_not_source
from sdtree.checkpoint._dcp_read import load_dcp_into, open_dcp
from sdtree.checkpoint._dcp_write import save_dcp, write_dcp
from sdtree.checkpoint._formats import Format, PathLike, destination_format, detect_format
from sdtree.checkpoint._layout import apply_transform, fit_format, keep_model
from sdtree.checkpoint._lazy import Checkpoint, Fetch, as_is, first_aliases, tensor_items
from sdtree.checkpoint._safetensors import open_safetensors, write_safetensors
from sdtree.checkpoint._torch_file import open_torch_file, write_torch_file
from sdtree.errors import CheckpointFormatError, UnsupportedLeafError
from sdtree.transforms.compose import Transform

__all__ = ["open_checkpoint", "save", "load", "convert", "Conversion", "Progress"]

Progress = Callable[[int, int], None]
"""Called after each tensor is fetched: ``progress(nbytes, total_bytes)``."""

_Writer = Callable[..., None]
_WRITERS: dict[Format, _Writer] = {
    "dcp": write_dcp,
    "torch": write_torch_file,
    "safetensors": write_safetensors,
}


def open_checkpoint(path: PathLike, *, trust_pickle: bool = False) -> Checkpoint:
    """Open the checkpoint at ``path``: its structure now, its tensors on demand.

    Only the index is read (DCP ``.metadata``, the pickle of a ``torch.save``
    file, a safetensors header); ``Checkpoint.fetch`` reads one tensor.

    Args:
        path: a DCP directory, a ``torch.save`` file or a safetensors file
            (see :func:`detect_format`).
        trust_pickle: unpickle anything (only for files from a trusted
            source); by default pickles are read with
            ``torch.load(weights_only=True)`` or, for DCP metadata, an
            unpickler that imports only DCP's own classes.

    Raises:
        CheckpointNotFoundError, CheckpointFormatError: no checkpoint at ``path``.
        UnsafeCheckpointError: reading would run code from the file.
        CorruptCheckpointError: the checkpoint is truncated or incomplete.
    """
    path = Path(path)
    fmt = detect_format(path)
    if fmt == "dcp":
        return open_dcp(path, trust_pickle=trust_pickle)
    if fmt == "torch":
        return open_torch_file(path, trust_pickle=trust_pickle)
    return open_safetensors(path)


def save(
    state_dict: Any,
    path: PathLike,
    *,
    format: Optional[Format] = None,
    force: bool = False,
    process_group: Any = None,
) -> Path:
    """Save a state dict (or a combined ``{"model": ..., "optim": ..., ...}``
    checkpoint) at ``path``; return the path.

    The file or directory appears only when complete: it is written under a
    temporary name beside ``path`` and renamed at the end.

    - ``"dcp"``: a ``torch.distributed.checkpoint`` directory. With a process
      group of several ranks up, every rank calls ``save`` (collective) and
      each writes its own shards (DTensors); otherwise one process writes it.
      Mapping keys must be strings, and empty dicts do not load back (DCP
      stores leaves; an optimizer's empty ``"state"`` is restored).
    - ``"torch"``: a file that loads with ``torch.load(weights_only=True)``.
    - ``"safetensors"``: a model state dict only; tied tensors are stored once.

    Args:
        format: the format; by default told from the name (``*.safetensors``,
            ``*.pt``/``.pth``/``.bin``/..., or no suffix for DCP).
        force: replace an existing ``path``.
        process_group: the group a DCP save runs over (default: the world).

    Raises:
        DestinationExistsError: ``path`` exists and ``force`` is false.
        DestinationError: ``path``'s directory cannot be created or written.
        CheckpointFormatError: the format cannot hold ``state_dict``.
        UnsupportedLeafError: a file format is given a sharded (DTensor) tensor.
    """
    path = Path(path)
    fmt = destination_format(path, format)
    if fmt == "dcp":
        save_dcp(state_dict, path, force=force, fn="save", process_group=process_group)
        return path
    tree = fit_format(state_dict, fmt, fn="save")
    with atomic_destination(path, force=force, directory=False, fn="save") as tmp:
        _WRITERS[fmt](tmp, tree, as_is, fn="save")
    return path


def load(path: PathLike, *, template: Any = None, trust_pickle: bool = False, process_group: Any = None) -> Any:
    """Load the checkpoint at ``path`` into new CPU tensors.

    Tied tensors of a safetensors or ``torch.save`` file load as one tensor
    object under each of their keys.

    Args:
        template: DCP only: a state dict whose tensors (DTensors too) give
            the shape and sharding to load into; then only its keys are read,
            and with a process group of several ranks up the call is
            collective and each rank reads its own shards (any world size).
        trust_pickle: see :func:`open_checkpoint`.
        process_group: the group a templated DCP load runs over.

    Raises:
        see :func:`open_checkpoint`; IncompatibleStateDictError when the
        template holds keys the checkpoint lacks.
    """
    path = Path(path)
    if template is None:
        return open_checkpoint(path, trust_pickle=trust_pickle).load()
    fmt = detect_format(path)
    if fmt != "dcp":
        raise CheckpointFormatError(
            f"load: template= reshards DCP checkpoints only, and {str(path)!r} is a {fmt} file. "
            "Load it without a template, then copy it in (sdtree.copy_state_dict / set_state_dict)."
        )
    return load_dcp_into(path, template, trust_pickle=trust_pickle, process_group=process_group)


@attrs.frozen
class Conversion:
    """What :func:`convert` did, or would do with ``dry_run=True``.

    Attributes:
        renamed: for each tensor of the source, by flat key (``"model.w"``),
            its flat key in the destination, or ``None`` if dropped.
        tensors, nbytes: the tensors written (tied ones once) and their size.
        streamed: tensors were read one at a time (false when the transform
            made new tensors, which needs the whole source in memory).
    """

    src: Path
    dst: Path
    src_format: Format
    dst_format: Format
    renamed: tuple[tuple[str, Optional[str]], ...]
    tensors: int
    nbytes: int
    streamed: bool
    written: bool


def convert(
    src: PathLike,
    dst: PathLike,
    *,
    transform: Optional[Transform] = None,
    to: Optional[Format] = None,
    force: bool = False,
    trust_pickle: bool = False,
    model_only: bool = False,
    dry_run: bool = False,
    progress: Optional[Progress] = None,
) -> Conversion:
    """Convert the checkpoint ``src`` to ``dst``, applying ``transform`` on the way.

    Any format converts to any other (DCP shards are consolidated). Tensors
    are read and written one at a time, so memory stays near the largest
    tensor — as long as ``transform`` only moves, renames or drops entries
    (every key transform); a transform that makes new tensors gets the whole
    source loaded first.

    Args:
        transform: applied to the model and optimizer entries of a combined
            checkpoint (``{"model": ..., "optim": ...}``), else to the whole
            state dict; e.g. ``strip_prefix("_orig_mod.") >> rename(...)``.
        to: the destination format; by default told from ``dst``'s name.
        force: replace an existing ``dst``.
        trust_pickle: see :func:`open_checkpoint`.
        model_only: write only the ``"model"`` entry of a combined
            checkpoint (needed to put one that holds more into safetensors).
        dry_run: only work out the key mapping; write nothing.
        progress: called as ``progress(nbytes, total_bytes)`` per tensor.

    Raises:
        DestinationError: ``dst`` is ``src`` or holds it (checked first, even
            with ``force``), or cannot be written.
        DestinationExistsError: ``dst`` exists and ``force`` is false (checked first).
        KeyCollisionError: the transform maps two keys to one.
        CheckpointFormatError: the destination format cannot hold the result.
        and the errors of :func:`open_checkpoint`.
    """
    src, dst = Path(src), Path(dst)
    check_not_source(src, dst, fn="convert")
    dst_format = destination_format(dst, to)
    if not dry_run:
        check_destination(dst, force=force, fn="convert")
    checkpoint = open_checkpoint(src, trust_pickle=trust_pickle)
    source, tree, streamed = _transformed(checkpoint, transform, model_only)
    tree = fit_format(tree, dst_format, fn="convert")
    tensors = _unique(tree, dst_format)
    total = sum(t.numel() * t.element_size() for t in tensors)
    result = Conversion(
        src, dst, checkpoint.format, dst_format, _renamed(source, tree), len(tensors), total, streamed, not dry_run
    )
    if dry_run:
        return result
    fetch = _reporting(checkpoint.fetch, progress, total)
    with atomic_destination(dst, force=force, directory=dst_format == "dcp", fn="convert") as tmp:
        _WRITERS[dst_format](tmp, tree, fetch, fn="convert")
    return result


def _transformed(
    checkpoint: Checkpoint, transform: Optional[Transform], model_only: bool
) -> tuple[Any, Any, bool]:
    """``(source, transformed, streamed)``: the transform applied to the
    placeholders if it keeps them, else to the loaded checkpoint."""
    try:
        out = apply_transform(transform, keep_model(checkpoint.tree) if model_only else checkpoint.tree)
    except UnsupportedLeafError:  # a tensor transform that refuses meta tensors
        out = None
    if out is not None and all(checkpoint.is_placeholder(leaf) or not leaf.is_meta for _, leaf in tensor_items(out)):
        return checkpoint.tree, out, True
    loaded = checkpoint.load()
    return loaded, apply_transform(transform, keep_model(loaded) if model_only else loaded), False


def _unique(tree: Any, fmt: Format) -> list[torch.Tensor]:
    """The tensors a writer of ``fmt`` fetches: one per key for DCP, tied ones once otherwise."""
    leaves = [leaf for leaf in tree_flatten(tree)[0] if isinstance(leaf, torch.Tensor)]
    if fmt == "dcp":
        return leaves
    return [leaf for i, (leaf, first) in enumerate(zip(leaves, first_aliases(leaves))) if first == i]


def _renamed(before: Any, after: Any) -> tuple[tuple[str, Optional[str]], ...]:
    """Pair each source tensor's flat key with its key after the transform (by identity)."""
    targets: dict[int, list[str]] = {}
    for key, leaf in tensor_items(after):
        targets.setdefault(id(leaf), []).append(key)
    pairs: list[tuple[str, Optional[str]]] = []
    for key, leaf in tensor_items(before):
        new = targets.get(id(leaf))
        pairs.append((key, new.pop(0) if new else None))
    return tuple(pairs)


def _reporting(fetch: Fetch, progress: Optional[Progress], total: int) -> Fetch:
    if progress is None:
        return fetch

    def fetch_and_report(tensor: torch.Tensor) -> torch.Tensor:
        out = fetch(tensor)
        progress(out.numel() * out.element_size(), total)
        return out

    return fetch_and_report
