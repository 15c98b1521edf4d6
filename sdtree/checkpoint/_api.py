"""Open, save, load and convert checkpoints in any of the four formats."""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Callable, Optional, Union

import attrs
import torch

from sdtree._tree import tree_flatten, tree_flatten_with_path
from sdtree.checkpoint._atomic import atomic_destination, check_destination, check_not_source
from sdtree.checkpoint._dcp_read import load_dcp_into, open_dcp
from sdtree.checkpoint._dcp_write import ZIP32_LIMIT, save_dcp, write_dcp
from sdtree.checkpoint._formats import Format, PathLike, destination_format, detect_format
from sdtree.checkpoint._hf import DEFAULT_MAX_SHARD_SIZE, open_hf, parse_size, write_hf
from sdtree.checkpoint.layout import (
    MODEL,
    MODEL_ONLY_FORMATS,
    OPTIM,
    apply_transform,
    fit_format,
    is_combined,
    keep_model,
    subtree,
)
from sdtree.checkpoint._lazy import Checkpoint, Fetch, as_is, dotted, first_aliases, tensor_items
from sdtree.checkpoint._safetensors import open_safetensors, write_safetensors
from sdtree.checkpoint._spans import SpanningFetch, concatenates_bytes
from sdtree.checkpoint._torch_file import open_torch_file, write_torch_file
from sdtree.errors import CheckpointFormatError, NothingToWriteError, UnsupportedLeafError, preview as _preview
from sdtree.transforms.compose import Transform
from sdtree.transforms.plans import Planned
from sdtree.transforms.rules import Materializer, derivation_of

__all__ = ["open_checkpoint", "save", "load", "convert", "Conversion", "Progress", "PlannedTensor"]

Progress = Callable[[int, int], None]
"""Called after each tensor is fetched: ``progress(nbytes, total_bytes)``."""

_Writer = Callable[..., None]
# the formats whose writers write a tensor piece by piece (see _spans), and the size it must stay below (None: any)
_PIECEWISE: dict[Format, Optional[int]] = {"dcp": ZIP32_LIMIT, "safetensors": None, "hf": None}
_FILE_WRITERS: dict[Format, _Writer] = {"torch": write_torch_file, "safetensors": write_safetensors}


def _writer(fmt: Format, dst: Path, max_shard_size: Union[int, str, None], fn: str, sync: bool) -> _Writer:
    """``write(tmp, tree, fetch, fn=...)`` for ``fmt``, made before anything is
    read: a DCP directory records ``dst``, where ``tmp`` will be renamed to,
    as its checkpoint id (its writer fsyncs each file with ``sync``, and
    like the safetensors and hf writers starts each tensor's writeback as it
    is written, see ``_atomic.start_writeback``); a
    Hugging Face one is sharded by ``max_shard_size`` (default ``"5GB"``),
    which the other formats refuse.

    Raises:
        CheckpointFormatError: ``max_shard_size`` is not a size, or is given
            for a format other than hf.
    """
    if fmt == "hf":
        limit = parse_size(DEFAULT_MAX_SHARD_SIZE if max_shard_size is None else max_shard_size, fn=fn)
        return functools.partial(write_hf, max_shard_size=limit, sync=sync)
    if max_shard_size is not None:
        raise CheckpointFormatError(
            f"{fn}: max_shard_size={max_shard_size!r} (--max-shard-size) sets the shard size of a Hugging "
            f"Face directory, but the destination format is {fmt!r}. Pass to='hf' (--to hf), or leave "
            "max_shard_size out. Nothing was written."
        )
    if fmt == "dcp":
        return functools.partial(write_dcp, checkpoint_id=dst, sync=sync)
    if fmt == "safetensors":
        return functools.partial(write_safetensors, sync=sync)
    return _FILE_WRITERS[fmt]


def open_checkpoint(path: PathLike, *, trust_pickle: bool = False) -> Checkpoint:
    """Open the checkpoint at ``path``: its structure now, its tensors on demand.

    Only the index is read (DCP ``.metadata``, the pickle of a ``torch.save``
    file, a safetensors header, a Hugging Face index and its shards'
    headers); ``Checkpoint.fetch`` reads one tensor.

    Args:
        path: a DCP directory, a ``torch.save`` file, a safetensors file or a
            Hugging Face directory (see :func:`detect_format`).
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
    if fmt == "hf":
        return open_hf(path, trust_pickle=trust_pickle)
    return open_safetensors(path)


def save(
    state_dict: Any,
    path: PathLike,
    *,
    format: Optional[Format] = None,
    force: bool = False,
    process_group: Any = None,
    max_shard_size: Union[int, str, None] = None,
    sync: bool = True,
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
    - ``"hf"``: a model state dict as a Hugging Face directory: safetensors
      shards and ``model.safetensors.index.json``, or one ``model.safetensors``
      when it fits a shard; tied tensors are stored once.

    Args:
        format: the format; by default told from the name (``*.safetensors``,
            ``*.pt``/``.pth``/``.bin``/..., or no suffix for DCP); ``"hf"``
            only when given.
        force: replace an existing ``path``.
        process_group: the group a DCP save runs over (default: the world).
        max_shard_size: hf only: the most tensor bytes per shard, an int or
            a size as Hugging Face writes it (``"500MB"``, ``"5GB"``: decimal
            units; ``"2GiB"``: binary); default ``"5GB"``. A larger tensor
            gets a shard of its own.
        sync: flush every file written to the disk (``fsync``) before the
            rename, and the rename after, so that once this returns a crash
            or power loss leaves the complete checkpoint at ``path``. Pass
            ``False`` for scratch files: faster, but after a crash ``path``
            may hold empty or partial files.

    Raises:
        DestinationExistsError: ``path`` exists and ``force`` is false.
        DestinationError: ``path``'s directory cannot be created or written.
        CheckpointFormatError: the format cannot hold ``state_dict``, or
            ``max_shard_size`` is not a size or is given for another format.
        UnsupportedLeafError: a file format is given a sharded (DTensor) tensor.
    """
    path = Path(path)
    fmt = destination_format(path, format)
    write = _writer(fmt, path, max_shard_size, "save", sync)
    if fmt == "dcp":
        save_dcp(state_dict, path, force=force, fn="save", sync=sync, process_group=process_group)
        return path
    tree = fit_format(state_dict, fmt, fn="save")
    with atomic_destination(path, force=force, directory=fmt == "hf", fn="save", sync=sync) as tmp:
        write(tmp, tree, as_is, fn="save")
    return path


def load(path: PathLike, *, template: Any = None, trust_pickle: bool = False, process_group: Any = None) -> Any:
    """Load the checkpoint at ``path`` into new CPU tensors.

    Tied tensors of a safetensors or ``torch.save`` file, or a Hugging Face
    directory sdtree wrote, load as one tensor object under each of their keys.

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
        streamed: tensors were read one at a time, or group by group (false
            when a transform needed the whole source in memory).
        plan: every tensor written, with its sources and rules.
        peak_bytes: the most memory of its own one of them holds while it
            is computed (the largest group, less what is mapped from the
            source; see :attr:`PlannedTensor.peak_bytes`): when ``streamed``,
            a bound on the conversion's peak anonymous memory above its
            baseline, but for a few MiB of Python objects and buffers.
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
    plan: tuple[PlannedTensor, ...] = ()
    peak_bytes: int = 0


@attrs.frozen
class PlannedTensor:
    """One tensor of the destination, as :func:`convert` plans it (no data read).

    Attributes:
        key: its flat key in the destination.
        shape, dtype: what it will hold.
        sources: the flat keys of the source tensors it is read or computed from.
        rules: the tensor transforms that compute it, innermost first
            (``("unpermute_for_rope", "fuse")``); empty when it is copied as it is.
        peak_bytes: the memory of its own held while it is computed: every
            output of the groups on the way, and its sources, but for those
            a conversion maps from the source file instead of reading them
            (:meth:`Checkpoint.is_mapped`: a safetensors file's or a Hugging
            Face shard's tensors). A DCP source is counted in full, though
            one stored as a single plain chunk is mapped too: which are is
            known only once their records are read.
    """

    key: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    sources: tuple[str, ...]
    rules: tuple[str, ...]
    peak_bytes: int


def convert(
    src: PathLike,
    dst: PathLike,
    *,
    transform: Optional[Transform] = None,
    to: Optional[Format] = None,
    force: bool = False,
    trust_pickle: bool = False,
    model_only: bool = False,
    key: Optional[str] = None,
    dry_run: bool = False,
    progress: Optional[Progress] = None,
    max_shard_size: Union[int, str, None] = None,
    sync: bool = True,
) -> Conversion:
    """Convert the checkpoint ``src`` to ``dst``, applying ``transform`` on the way.

    Any format converts to any other (DCP shards are consolidated). Tensors
    are read and written one at a time, so memory stays near the largest
    tensor, or with tensor transforms (fuse, split, stack, permute, cast,
    ...) near the largest group: each output is computed from its sources
    when the writer reaches it. Only a transform that cannot plan on meta
    tensors (a ``map_tensors`` whose function needs data, ``offload_to_cpu``)
    gets the whole source loaded first.

    A tensor stored plainly in the source (in a safetensors file or Hugging
    Face shard; in DCP, one chunk of at least 1 MiB) is not copied into
    memory: written as it is stored, its bytes are copied from file to file
    by the kernel (:meth:`Checkpoint.span`, ``copy_file_range``), their CRC
    checked or summed beside the copy; an output computed from it reads the
    source file's bytes mapped copy-on-write (:meth:`Checkpoint.borrow`). So
    a conversion that only renames keys holds little memory of its own, and
    the source files are never written. Mapped pages are the page cache's;
    a source truncated while it is converted ends the process (SIGBUS).

    Args:
        transform: applied to the model and optimizer entries of a combined
            checkpoint (``{"model": ..., "optim": ...}``), else to the whole
            state dict; e.g. ``strip_prefix("_orig_mod.") >> rename(...)``.
            One built with :func:`~sdtree.transforms.each` or
            :func:`~sdtree.transforms.at` applies to the whole checkpoint as
            written (``each(t)`` does what ``t`` does).
        to: the destination format; by default told from ``dst``'s name.
        force: replace an existing ``dst``.
        trust_pickle: see :func:`open_checkpoint`.
        model_only: write only the ``"model"`` entry of a combined
            checkpoint (needed to put one that holds more into safetensors
            or hf). A safetensors or hf source is a model state dict
            already; any other without a ``"model"`` state dict is an error.
        key: convert only the entry at this dotted path of the source (the
            ``"state_dict"`` of a trainer's checkpoint), before ``model_only``
            and ``transform``.
        dry_run: only work out the key mapping; write nothing.
        progress: called as ``progress(nbytes, total_bytes)`` per tensor.
        max_shard_size: ``to="hf"`` only: see :func:`save`.
        sync: see :func:`save` (``--no-sync`` on the command line).

    Raises:
        DestinationError: ``dst`` is ``src`` or holds it (checked first, even
            with ``force``), or cannot be written.
        DestinationExistsError: ``dst`` exists and ``force`` is false (checked first).
        NothingToWriteError: the result would hold no tensor: ``transform``
            drops every one, ``model_only`` finds no ``"model"`` state dict,
            or the source holds none. Non-tensor entries alone (a step
            count) are nothing to write. Raised before anything is written,
            and by a dry run too.
        KeyCollisionError: the transform maps two keys to one.
        CheckpointFormatError: the destination format cannot hold the
            result, or ``max_shard_size`` is bad (checked first).
        and the errors of :func:`open_checkpoint`.
    """
    src, dst = Path(src), Path(dst)
    check_not_source(src, dst, fn="convert")
    dst_format = destination_format(dst, to)
    write = _writer(dst_format, dst, max_shard_size, "convert", sync)
    if not dry_run:
        check_destination(dst, force=force, fn="convert")
    checkpoint = open_checkpoint(src, trust_pickle=trust_pickle)
    base = subtree(checkpoint.tree, key, fn="convert")
    if model_only and checkpoint.format not in MODEL_ONLY_FORMATS and not is_combined(base):
        raise NothingToWriteError(_no_model(checkpoint, base))
    source, tree, streamed = _transformed(checkpoint, base, key, transform, model_only)
    tree = fit_format(tree, dst_format, fn="convert")
    tensors = _unique(tree, dst_format)
    if not tensors:
        raise NothingToWriteError(_nothing_left(checkpoint, source, tree, transform, model_only))
    total = sum(t.numel() * t.element_size() for t in tensors)
    plan = _plan(checkpoint, source, tree, dst_format)
    result = Conversion(
        src, dst, checkpoint.format, dst_format, _renamed(source, tree), len(tensors), total, streamed, not dry_run,
        plan, max((p.peak_bytes for p in plan), default=0),
    )
    if dry_run:
        return result
    fetch = SpanningFetch(
        _reporting(Materializer(tree, checkpoint.borrow), progress, total),
        lambda leaf: checkpoint.span(leaf) if derivation_of(leaf) is None else None,  # stored as it is written
        None if progress is None else lambda nbytes: progress(nbytes, total),
    )
    with atomic_destination(dst, force=force, directory=dst_format in ("dcp", "hf"), fn="convert", sync=sync) as tmp:
        write(tmp, tree, fetch, fn="convert")
    return result


def _no_model(checkpoint: Checkpoint, tree: Any) -> str:
    holds = f"top-level keys: {_preview(tree)}" if isinstance(tree, Mapping) else f"it holds a {type(tree).__name__}"
    return (
        f"convert: model_only=True (--model-only) writes the {MODEL!r} entry of a combined checkpoint "
        f"({{{MODEL!r}: ..., {OPTIM!r}: ...}}), but {str(checkpoint.path)!r} has no {MODEL!r} state dict "
        f"({holds}). Nothing was written. Convert it without model_only, or keep part of it with a "
        "transform (select_keys, drop_keys)."
    )


def _nothing_left(
    checkpoint: Checkpoint, source: Any, result: Any, transform: Optional[Transform], model_only: bool
) -> str:
    """Why a conversion would write no tensor, and what to change."""
    where = str(checkpoint.path)
    paths, _, _ = tree_flatten_with_path(result)
    only = f" (only {_preview(dotted(p) for p in paths)})" if paths else ""
    kept = keep_model(source) if model_only else source
    hint = ""
    if not tensor_items(source):
        problem = f"{where!r} holds no tensor"
    elif not tensor_items(kept):
        problem = f"the {MODEL!r} entry of {where!r}, all that model_only=True (--model-only) keeps, holds no tensor"
    else:
        dropped = [key for key, _ in tensor_items(kept)]
        problem = (
            f"the transform {transform!r} drops all {len(dropped)} tensors of {where!r} "
            f"({_preview(dropped)}), so the result would hold no tensor"
        )
        hint = (
            " Check its rules against the keys that `sdtree inspect` lists: on a combined checkpoint "
            f"they see the keys inside its {MODEL!r} and {OPTIM!r} entries, without {MODEL + '.'!r} "
            f"or {OPTIM + '.'!r} in front."
        )
    return f"convert: {problem}{only}: nothing to write. Nothing was written.{hint}"


def _transformed(
    checkpoint: Checkpoint, base: Any, key: Optional[str], transform: Optional[Transform], model_only: bool
) -> tuple[Any, Any, bool]:
    """``(source, transformed, streamed)``: the transform applied to the
    placeholders of ``base`` (the entry at ``key``) if it keeps them, else to
    the loaded checkpoint."""
    try:
        out = apply_transform(transform, keep_model(base) if model_only else base)
    except UnsupportedLeafError:  # a tensor transform that refuses meta tensors
        out = None
    if out is not None and all(
        checkpoint.is_placeholder(leaf) or derivation_of(leaf) is not None or not leaf.is_meta
        for _, leaf in tensor_items(out)
    ):  # tensor transforms plan meta outputs that the Materializer computes group by group
        return base, out, True
    loaded = subtree(checkpoint.load(), key, fn="convert")
    return loaded, apply_transform(transform, keep_model(loaded) if model_only else loaded), False


def _unique(tree: Any, fmt: Format) -> list[torch.Tensor]:
    """The tensors a writer of ``fmt`` fetches: one per key for DCP, tied ones once otherwise."""
    leaves = [leaf for leaf in tree_flatten(tree)[0] if isinstance(leaf, torch.Tensor)]
    if fmt == "dcp":
        return leaves
    return [leaf for i, (leaf, first) in enumerate(zip(leaves, first_aliases(leaves))) if first == i]


def _plan(checkpoint: Checkpoint, source: Any, tree: Any, fmt: Format) -> tuple[PlannedTensor, ...]:
    """What each tensor a writer of ``fmt`` fetches is made of, traced through
    the derivations of the tensor transforms back to the source's keys."""
    source_keys = {id(leaf): key for key, leaf in tensor_items(source)}
    written = {id(t) for t in _unique(tree, fmt)}
    plan = []
    limit = _PIECEWISE.get(fmt, 0)  # 0: not piecewise
    for key, leaf in tensor_items(tree):
        if id(leaf) not in written:
            continue
        written.discard(id(leaf))  # tied: planned once, under its first key
        piecewise = limit is None or math.prod(leaf.shape) * leaf.dtype.itemsize < limit
        sources, rules, peak = _trace(leaf, source_keys, key, checkpoint.is_mapped, piecewise)
        plan.append(PlannedTensor(key, tuple(leaf.shape), leaf.dtype, tuple(dict.fromkeys(sources)), rules, peak))
    return tuple(plan)


def _trace(
    leaf: Planned, source_keys: Mapping[int, str], key: str, mapped: Callable[[torch.Tensor], bool], piecewise: bool
) -> tuple[list[str], tuple[str, ...], int]:
    """``(source keys, rules innermost first, bytes held)`` of a planned tensor
    (its derivation's sources: tensors, or outputs a pipeline left pending); a
    source ``mapped`` from its file holds none; written ``piecewise``, a
    concatenation along dim 0 holds one part at a time, never itself (see ``_spans``)."""
    derived = derivation_of(leaf)
    if derived is None:
        # only a rule's outputs are pending, and those have a derivation: ``leaf`` is a source tensor
        borrowed = isinstance(leaf, torch.Tensor) and mapped(leaf)
        return [source_keys.get(id(leaf), key)], (), 0 if borrowed else math.prod(leaf.shape) * leaf.dtype.itemsize
    derivation = derived[0]
    in_pieces = piecewise and concatenates_bytes(derivation)
    sources: list[str] = []
    rules: list[str] = []
    held = 0 if in_pieces else sum(math.prod(shape) * dtype.itemsize for shape, dtype in derivation.outputs)
    for part in derivation.sources:
        part_sources, part_rules, part_held = _trace(part, source_keys, key, mapped, in_pieces)
        sources += part_sources
        rules += [r for r in part_rules if r not in rules]
        held = max(held, part_held) if in_pieces else held + part_held
    return sources, (*rules, derivation.rule), held


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
