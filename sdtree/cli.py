"""The ``sdtree`` command line: ``inspect``, ``diff``, ``convert`` and ``demo``.

Exit status: 0 on success (``diff``: the checkpoints are equal), 1 when
``diff`` finds differences, 2 on bad input (one error line on stderr), and
141 (128 + SIGPIPE, as a shell reports ``yes | head``), silently, when the
reader of the output goes away early (``sdtree convert ... --dry-run | head``).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from sdtree import __version__
from sdtree._tree import tree_flatten_with_path
from sdtree.checkpoint import FORMATS, CheckpointDiff, Conversion, Summary, convert, describe, diff, open_checkpoint
from sdtree.checkpoint.layout import apply_transform, keep_model, subtree
from sdtree.errors import InvalidRuleError, PatternMatchError, SdtreeError, UnsupportedLeafError, preview
from sdtree.recipes import llama, moe
from sdtree.transforms import Transform, add_prefix, cast, drop_keys, pipeline, rename, select_keys, strip_prefix

__all__ = ["main", "demo_script"]

PROG = "sdtree"

EXIT_BROKEN_PIPE = 128 + 13
"""The status when stdout's reader went away: what a shell reports for a
process that SIGPIPE ended (``yes | head``), and apart from 1 (differences)."""


DEMO_PROG_VARIABLE = "SDTREE_DEMO_PROG"
"""The environment variable that tells the demo trainer its command's name."""


def demo_script() -> Path:
    """Where ``sdtree demo`` looks for the end-to-end demo trainer (in a source checkout)."""
    return Path(__file__).resolve().parents[1] / "examples" / "train_resume.py"


# -- argument parsing -----------------------------------------------------------


class _Step(argparse.Action):
    """Append ``(option, value)`` to ``namespace.steps``, keeping command-line order."""

    def __call__(
        self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any, option_string: Optional[str] = None
    ) -> None:
        namespace.steps = [*namespace.steps, (self.dest, values)]


# --recipe NAME: (family, direction)
RECIPES = {
    "llama-hf-to-torchtitan": ("llama", "to_torchtitan"),
    "llama-torchtitan-to-hf": ("llama", "to_hf"),
    "mixtral-hf-to-torchtitan": ("mixtral", "to_torchtitan"),
    "mixtral-torchtitan-to-hf": ("mixtral", "to_hf"),
}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Inspect, compare and convert PyTorch checkpoints: DCP directories, "
        "torch.save files, safetensors files and Hugging Face directories.",
    )
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    inspect = commands.add_parser("inspect", help="list keys, shapes, dtypes, sizes and param groups")
    inspect.add_argument("path", help="a DCP directory, torch.save file, safetensors file or Hugging Face directory")
    inspect.add_argument("--json", action="store_true", help="print JSON for machines")
    _trust_option(inspect)

    compare = commands.add_parser("diff", help="compare two checkpoints (exit 0: equal, 1: different)")
    compare.add_argument("a", help="checkpoint A")
    compare.add_argument("b", help="checkpoint B")
    compare.add_argument("--rtol", type=float, default=0.0, help="relative tolerance (default 0: exact)")
    compare.add_argument("--atol", type=float, default=0.0, help="absolute tolerance (default 0: exact)")
    _trust_option(compare)

    conv = commands.add_parser(
        "convert",
        help="convert between formats, renaming keys on the way",
        description="Convert SRC to DST, one tensor at a time. Key options apply in the order given, "
        "to the model and optimizers of a {'model': ..., 'optim': ...} checkpoint alike "
        "(every top-level entry that is an optimizer state dict keyed by FQNs, whatever its name).",
    )
    conv.set_defaults(steps=[])
    conv.add_argument("src", help="the checkpoint to read")
    conv.add_argument("dst", help="where to write (*.safetensors, *.pt, a directory name for DCP, or one for --to hf)")
    conv.add_argument("--strip-prefix", action=_Step, metavar="P", help="strip P from keys that start with it")
    conv.add_argument("--add-prefix", action=_Step, metavar="P", help="put P before every key")
    conv.add_argument(
        "--rename", action=_Step, nargs=2, metavar=("PATTERN", "REPL"), help="re.sub(PATTERN, REPL, key) on every key"
    )
    conv.add_argument("--select", action=_Step, metavar="P", help="keep only the keys that start with P")
    conv.add_argument("--drop", action=_Step, metavar="P", help="drop the keys that start with P")
    conv.add_argument(
        "--dtype", action=_Step, metavar="DTYPE", help="cast every floating-point tensor to DTYPE (e.g. bfloat16)"
    )
    conv.add_argument(
        "--transform",
        action=_Step,
        metavar="FILE.py:NAME",
        help="apply the sdtree Transform NAME defined in FILE.py (or returned by NAME(), a recipe)",
    )
    conv.add_argument(
        "--recipe",
        action=_Step,
        choices=sorted(RECIPES),
        help="a conversion of sdtree.recipes, with its model's shape from --n-heads, --n-kv-heads, --dim",
    )
    shape = conv.add_argument_group("recipe shape (with --recipe)")
    shape.add_argument("--n-heads", type=int, help="attention heads (q)")
    shape.add_argument("--n-kv-heads", type=int, help="key/value heads (k and v; = --n-heads without GQA)")
    shape.add_argument("--dim", type=int, help="the model's width (hidden_size)")
    shape.add_argument("--head-dim", type=int, help="per-head width, when not dim / n-heads")
    shape.add_argument("--fuse-qkv", action="store_true", help="fuse q, k and v into attention.wqkv")
    shape.add_argument("--fuse-w13", action="store_true", help="fuse gate and up into feed_forward.w13 (llama)")
    shape.add_argument(
        "--tie-word-embeddings", action="store_true", help="the Hugging Face side has no lm_head.weight (tied)"
    )
    conv.add_argument(
        "--key",
        metavar="PATH",
        help="convert only the entry at PATH (dotted, e.g. 'state_dict' of a trainer's checkpoint)",
    )
    conv.add_argument("--to", choices=FORMATS, help="the destination format (default: from DST's name; hf only when given)")
    conv.add_argument(
        "--max-shard-size",
        metavar="SIZE",
        help="--to hf: the most tensor bytes per shard, as Hugging Face writes it: 500MB, 5GB (decimal "
        "units), 2GiB (binary) or a number of bytes; a larger tensor gets a shard of its own (default 5GB)",
    )
    conv.add_argument("--model-only", action="store_true", help="write only the 'model' entry of the checkpoint")
    conv.add_argument("--force", action="store_true", help="replace DST if it exists")
    conv.add_argument("--dry-run", action="store_true", help="print the key mapping (old -> new); write nothing")
    conv.add_argument(
        "--no-sync",
        dest="sync",
        action="store_false",
        help="do not flush DST to the disk (fsync) before renaming it into place: faster, for scratch "
        "conversions; after a crash or power loss DST may hold empty or partial files",
    )
    conv.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="show a progress bar on stderr (default: when stderr is a terminal)",
    )
    _trust_option(conv)

    commands.add_parser(
        "demo",
        help="run the end-to-end demo trainer (examples/train_resume.py); arguments pass through",
        add_help=False,
    )
    return parser


def _trust_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--trust-pickle",
        action="store_true",
        help="unpickle anything in the checkpoint (only for files from a trusted source: it can run code)",
    )


# -- commands -----------------------------------------------------------------


def _human(nbytes: int) -> str:
    if nbytes < 1024:
        return f"{nbytes} B"
    size = nbytes / 1024
    for unit in ("KiB", "MiB"):
        if size < 1024:
            return f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GiB"


def _table(rows: Sequence[tuple[str, ...]]) -> list[str]:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]


def _render_summary(summary: Summary) -> str:
    lines = [f"{summary.path} ({summary.format})"]
    if summary.tensors:
        rows = [("key", "shape", "dtype", "bytes")]
        for t in summary.tensors:
            size = f"tied to {t.tied_to}" if t.tied_to else _human(t.nbytes)
            rows.append((t.key, str(list(t.shape)), t.dtype, size))
        lines += _table(rows)
    stored = sum(t.tied_to is None for t in summary.tensors)
    tied = f" ({len(summary.tensors) - stored} tied)" if stored != len(summary.tensors) else ""
    per_dtype = ", ".join(f"{d}: {n}, {_human(b)}" for d, (n, b) in summary.by_dtype().items())
    lines.append(f"total: {len(summary.tensors)} tensors{tied}, {_human(summary.stored_bytes)}" + (f" ({per_dtype})" if per_dtype else ""))
    for group in summary.param_groups:
        hyper = ", ".join(f"{k}={v!r}" for k, v in group.hyper.items())
        lines.append(f"param group {group.key}: {group.params} params; {hyper}")
    for key, value in summary.values:
        text = repr(value)
        lines.append(f"value {key} = {text if len(text) <= 80 else text[:77] + '...'}")
    if summary.shards:
        lines.append(f"shards: {len(summary.shards)}")
        lines += ["  " + row for row in _table([("file", "bytes", "tensors")] + [(s.name, _human(s.nbytes), str(s.tensors)) for s in summary.shards])]
    return "\n".join(lines)


def _inspect(args: argparse.Namespace) -> int:
    summary = describe(args.path, trust_pickle=args.trust_pickle)
    print(json.dumps(summary.to_json(), indent=2) if args.json else _render_summary(summary))
    return 0


def _render_diff(result: CheckpointDiff) -> str:
    if result.equal:
        return f"equal: {result.a} and {result.b} ({result.compared} keys compared)"
    lines = [f"A: {result.a}", f"B: {result.b}"]
    lines += [f"{d.kind:<10}  {d.key}: {d.detail}" for d in result.differences]
    lines.append(f"{len(result.differences)} difference(s); {result.compared} keys in both were compared")
    return "\n".join(lines)


def _diff(args: argparse.Namespace) -> int:
    result = diff(args.a, args.b, rtol=args.rtol, atol=args.atol, trust_pickle=args.trust_pickle)
    print(_render_diff(result))
    return 0 if result.equal else 1


def _recipe(name: str, args: argparse.Namespace) -> Transform:
    """The recipe ``name`` for the shape given by the shape options."""
    missing = [f"--{o.replace('_', '-')}" for o in ("n_heads", "n_kv_heads", "dim") if getattr(args, o) is None]
    if missing:
        raise InvalidRuleError(f"--recipe {name}: give the model's shape: {', '.join(missing)} (from its config.json).")
    family, direction = RECIPES[name]
    shape: dict[str, Any] = dict(
        n_heads=args.n_heads, n_kv_heads=args.n_kv_heads, dim=args.dim, head_dim=args.head_dim,
        fuse_qkv=args.fuse_qkv, tie_word_embeddings=args.tie_word_embeddings,
    )
    if family == "llama":
        recipe = llama.hf_to_torchtitan(**shape, fuse_w13=args.fuse_w13)
    elif args.fuse_w13:
        raise InvalidRuleError(f"--recipe {name}: --fuse-w13 is for llama; Mixtral's experts are stacked instead.")
    else:
        recipe = moe.mixtral_to_torchtitan(**shape)
    return recipe if direction == "to_torchtitan" else recipe.inverse()


def _transform(steps: list[tuple[str, Any]], args: argparse.Namespace) -> list[Transform]:
    """The transforms the key and tensor options ask for, in command-line order."""
    made: list[Transform] = []
    for option, value in steps:
        if option == "strip_prefix":
            made.append(strip_prefix(value, strict=False))
        elif option == "add_prefix":
            made.append(add_prefix(value))
        elif option == "rename":
            made.append(rename([(value[0], value[1])]))
        elif option == "select":
            made.append(select_keys(value))
        elif option == "drop":
            made.append(drop_keys(value))
        elif option == "dtype":
            made.append(cast(_dtype(value)))
        elif option == "recipe":
            made.append(_recipe(value, args))
        else:
            made.append(_user_transform(value))
    return made


def _dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        floats = sorted(n for n in dir(torch) if isinstance(getattr(torch, n), torch.dtype) and getattr(torch, n).is_floating_point)
        raise InvalidRuleError(f"--dtype {name!r} is not a floating-point torch dtype; choose one of {', '.join(floats)}.")
    return dtype


def _user_transform(spec: str) -> Transform:
    """The Transform ``NAME`` of ``FILE.py:NAME`` (or what ``NAME()`` returns)."""
    path, sep, name = spec.rpartition(":")
    if not sep or not path or not name:
        raise InvalidRuleError(f"--transform {spec!r}: expected FILE.py:NAME, e.g. my_rules.py:to_titan.")
    module = _load_file(Path(path), spec)
    if not hasattr(module, name):
        defined = [n for n, v in vars(module).items() if isinstance(v, Transform) and not n.startswith("_")]
        raise InvalidRuleError(
            f"--transform {spec!r}: {path!r} defines no {name!r}"
            + (f"; the Transforms it defines are {', '.join(defined)}." if defined else "; it defines no Transform.")
        )
    value = getattr(module, name)
    if callable(value) and not isinstance(value, Transform):
        try:
            value = value()
        except TypeError as err:
            raise InvalidRuleError(
                f"--transform {spec!r}: {name} is a function that cannot be called without arguments ({err}); "
                "give the name of a Transform, or of a function that takes none and returns one."
            ) from None
    if not isinstance(value, Transform):
        raise InvalidRuleError(
            f"--transform {spec!r}: {name} is {type(value).__name__} {value!r:.60}, not an sdtree Transform "
            "(build one with the factories of sdtree.transforms)."
        )
    return value


def _load_file(path: Path, spec: str) -> Any:
    if not path.is_file():
        raise InvalidRuleError(f"--transform {spec!r}: there is no file {str(path)!r}.")
    loader = importlib.util.spec_from_file_location(f"sdtree_user_transform_{path.stem}", path)
    if loader is None or loader.loader is None:
        raise InvalidRuleError(f"--transform {spec!r}: {str(path)!r} is not a Python file.")
    module = importlib.util.module_from_spec(loader)
    try:
        loader.loader.exec_module(module)
    except Exception as err:  # noqa: BLE001  # the user's file: report what it raised, in one line
        raise InvalidRuleError(f"--transform {spec!r}: running {str(path)!r} raised {type(err).__name__}: {err}") from None
    return module


_KEY_OPTIONS = ("strip_prefix", "add_prefix", "rename", "drop")  # each must change some key


def _check_each_step_acts(args: argparse.Namespace, made: list[Transform]) -> None:
    """Run the steps on the source's index (no tensor data) before converting:
    a key option that changes no key is an error, not a silent no-op (a
    mistyped prefix would otherwise convert the checkpoint unchanged), and a
    rule that does not fit fails here, before anything is read."""
    if not made:
        return
    tree = subtree(open_checkpoint(args.src, trust_pickle=args.trust_pickle).tree, args.key, fn="convert")
    if args.model_only:
        tree = keep_model(tree)
    keys = tree_flatten_with_path(tree)[0]
    for (option, value), step in zip(args.steps, made):
        try:
            tree = apply_transform(step, tree)
        except UnsupportedLeafError:  # a step that needs the data: convert loads it and runs the rest
            return
        after = tree_flatten_with_path(tree)[0]
        if after == keys and option in _KEY_OPTIONS:
            flag = f"--{option.replace('_', '-')} {' '.join(map(repr, value)) if isinstance(value, (list, tuple)) else repr(value)}"
            raise PatternMatchError(
                f"convert: {flag} changes no key of {str(args.src)!r} (its keys look like "
                f"{preview(('.'.join(map(str, p)) for p in keys[:3]), quote=False)}). "
                "Check the option against the keys that 'sdtree inspect' lists."
            )
        keys = after


def _render_plan(result: Conversion, transform: Optional[Transform]) -> str:
    """A dry run's plan: each tensor to write with its shape, dtype and where
    it comes from (a source key, or rules over source keys), the keys
    dropped, and the memory the largest group needs."""
    used = {key for p in result.plan for key in p.sources}
    lines = []
    for p in result.plan:
        what = f"[{', '.join(map(str, p.shape))}] {str(p.dtype).removeprefix('torch.')}"
        if p.rules:
            lines.append(f"{p.key}  {what}  <- {' >> '.join(p.rules)} of {', '.join(p.sources)}")
        else:
            lines.append(f"{p.sources[0]} -> {p.key}  {what}")
    lines += [f"{old} -> (dropped)" for old, new in result.renamed if new is None and old not in used]
    largest = max(result.plan, key=lambda p: p.peak_bytes, default=None)
    peak = f"; peak memory about {_human(result.peak_bytes)} (largest: {largest.key})" if largest is not None else ""
    lines.append(
        f"dry run: would write {result.dst} ({result.dst_format}): {result.tensors} tensors, "
        f"{_human(result.nbytes)}{peak}" + (f"; transform: {transform!r}" if transform else "")
    )
    return "\n".join(lines)


def _progress_bar(enabled: bool) -> tuple[Optional[Callable[[int, int], None]], Callable[[], None]]:
    """A ``progress(nbytes, total)`` callback drawing a tqdm bar on stderr, and its closer."""
    if not enabled:
        return None, lambda: None
    from tqdm import tqdm  # type: ignore[import-untyped]  # no stubs shipped

    bars: list[Any] = []

    def update(nbytes: int, total: int) -> None:
        if not bars:
            bars.append(tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, file=sys.stderr, desc="convert"))
        bars[0].update(nbytes)

    return update, lambda: bars[0].close() if bars else None


def _convert(args: argparse.Namespace) -> int:
    made = _transform(args.steps, args)  # a bad rule or recipe raises here, before any file is read
    _check_each_step_acts(args, made)
    transform = pipeline(*made) if made else None
    show = sys.stderr.isatty() if args.progress is None else args.progress
    progress, close = _progress_bar(show and not args.dry_run)
    start = time.perf_counter()
    try:
        result = convert(
            args.src,
            args.dst,
            transform=transform,
            to=args.to,
            force=args.force,
            trust_pickle=args.trust_pickle,
            model_only=args.model_only,
            key=args.key,
            dry_run=args.dry_run,
            progress=progress,
            max_shard_size=args.max_shard_size,
            sync=args.sync,
        )
    finally:
        close()
    if args.dry_run:
        print(_render_plan(result, transform))
        return 0
    seconds = time.perf_counter() - start
    print(
        f"wrote {result.dst} ({result.dst_format}) from {result.src} ({result.src_format}): "
        f"{result.tensors} tensors, {_human(result.nbytes)} in {seconds:.1f} s"
    )
    return 0


def _demo(args: list[str]) -> int:
    script = demo_script()
    if not script.is_file():
        _error(f"demo: the demo trainer {str(script)!r} is missing; it ships with the sdtree source repository (run from a checkout).")
        return 2
    # The trainer's argparse names itself after this (its usage line says ``sdtree demo``).
    env = {**os.environ, DEMO_PROG_VARIABLE: f"{PROG} demo"}
    return subprocess.call([sys.executable, str(script), *args], env=env)


def _error(message: str) -> None:
    print(f"{PROG}: error: {' '.join(message.split())}", file=sys.stderr)


_COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {"inspect": _inspect, "diff": _diff, "convert": _convert}


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the command line on ``argv`` (default: ``sys.argv[1:]``); return the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "demo":  # everything after it belongs to the trainer
        return _demo(argv[1:])
    args = _parser().parse_args(argv)
    try:
        status = _COMMANDS[args.command](args)
        sys.stdout.flush()  # a closed pipe shows here, not at exit
        return status
    except BrokenPipeError:  # stdout closed early (`sdtree ... | head`): stop quietly
        _silence_stdout()
        return EXIT_BROKEN_PIPE
    except (SdtreeError, OSError) as err:
        _error(str(err))
        return 2


def _silence_stdout() -> None:
    """Point stdout at the null device, so that the interpreter's last flush
    of what is still buffered does not fail again (Python's advice for EPIPE)."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, sys.stdout.fileno())
    finally:
        os.close(devnull)
