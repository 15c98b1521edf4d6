"""Convert a Hugging Face checkpoint with ``sdtree convert``: against copying
its bytes and against transformers' load + save, in one run.

Builds a Llama-shaped checkpoint of about 2 GB (fp32, random init; no
download) with transformers' ``save_pretrained``, in 4 shards, and a DCP copy
of it; then, each in a fresh process and interleaved over ``--rounds``
rounds:

- ``copy``: ``shutil.copyfile`` of the source's files (the disk floor), and
  ``copy + fsync`` (the floor of a durable write);
- (a) ``sdtree convert SRC DST`` to DCP; (b) ``sdtree convert DCP DST --to hf
  --max-shard-size 500MB``; (c) ``sdtree convert SRC DST --recipe
  llama-hf-to-torchtitan --fuse-qkv --fuse-w13`` to DCP: sdtree fsyncs what
  it writes; each also with ``--no-sync``;
- ``transformers``: ``LlamaForCausalLM.from_pretrained(SRC)`` then
  ``save_pretrained(DST, max_shard_size="500MB")`` (which does not fsync),
  and ``transformers + fsync`` (then ``os.fsync`` of each file it wrote).

Time is the operation's wall time inside the child, after its imports (the
process's whole life, imports included, is shown too). Memory is the child's
``RssAnon`` (anonymous resident memory; file pages mapped from the page cache
do not count) and ``VmRSS`` (all resident memory, mapped file pages
included), sampled by this process every 2 ms, above what they were once the
child's imports were done. The children run with
``MALLOC_MMAP_THRESHOLD_=131072``: otherwise glibc's dynamic threshold keeps
freed tensor buffers on the heap, shown as a false peak of 32-128 MiB.

The page cache cannot be dropped without root: the source files are read
once before the first round, so every round reads them from memory; writes
go to the page cache (and with fsync, to the disk). Each output is removed
after its run, then ``os.sync()`` flushes that removal and the run waits
until the kernel holds no dirty pages, and a second more, so that no run's
fsync pays for the previous run's (the journal commit, and on a file system
mounted with ``discard``, trimming the freed blocks, which ext4 does after
the commit without waiting). Each round starts one variant later than the
last, so no variant always follows the same one.

    python benchmarks/bench_hf.py [--rounds 5] [--dir DIR] [--lock /tmp/cpu.lock]

``--lock FILE`` holds ``flock(FILE)`` while building and during each round
(not between), so other users of the machine do not disturb the timings.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Optional

MIB = 1 << 20
LAYERS, DIM, HEADS, KV_HEADS, FFN, VOCAB = 6, 2048, 32, 8, 8192, 28672
SHARD = "500MB"
RECIPE = [
    "--recipe", "llama-hf-to-torchtitan", "--n-heads", str(HEADS), "--n-kv-heads", str(KV_HEADS),
    "--dim", str(DIM), "--fuse-qkv", "--fuse-w13",
]  # fmt: skip
# name -> (kind, source: "hf" or "dcp", extra CLI arguments)
VARIANTS: dict[str, tuple[str, str, list[str]]] = {
    "copy": ("copy", "hf", []),
    "copy + fsync": ("copy", "hf", ["sync"]),
    "(a) sdtree hf -> dcp": ("sdtree", "hf", []),
    "(a) sdtree hf -> dcp --no-sync": ("sdtree", "hf", ["--no-sync"]),
    "(b) sdtree dcp -> hf": ("sdtree", "dcp", ["--to", "hf", "--max-shard-size", SHARD]),
    "(b) sdtree dcp -> hf --no-sync": ("sdtree", "dcp", ["--to", "hf", "--max-shard-size", SHARD, "--no-sync"]),
    "(c) sdtree hf -> torchtitan": ("sdtree", "hf", RECIPE),
    "(c) sdtree hf -> torchtitan --no-sync": ("sdtree", "hf", [*RECIPE, "--no-sync"]),
    "transformers load + save": ("transformers", "hf", []),
    "transformers + fsync": ("transformers", "hf", ["sync"]),
}


def memory(pid: Any = "self") -> Optional[tuple[int, int]]:
    """``(RssAnon, VmRSS)`` of process ``pid``, in bytes (``None`` once it has exited)."""
    try:
        with open(f"/proc/{pid}/status") as status:
            fields = dict(line.split(":", 1) for line in status)
        return int(fields["RssAnon"].split()[0]) * 1024, int(fields["VmRSS"].split()[0]) * 1024
    except (FileNotFoundError, ProcessLookupError, KeyError):
        return None


def _fsync_tree(path: Path) -> None:
    """fsync every file under ``path``, then the directories."""
    for root, _, files in os.walk(path):
        for name in files:
            fd = os.open(os.path.join(root, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fd = os.open(root, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


# -- one measured operation (run in a fresh process) ---------------------------------


def child(kind: str, src: Path, dst: Path, extra: list[str]) -> None:
    """Import what ``kind`` needs, then time the operation; print JSON."""
    if kind == "sdtree":
        import sdtree.cli

        def op() -> None:
            code = sdtree.cli.main(["convert", str(src), str(dst), "--no-progress", *extra])
            if code != 0:
                raise SystemExit(code)

    elif kind == "transformers":
        import torch
        from transformers import LlamaForCausalLM

        def op() -> None:
            model = LlamaForCausalLM.from_pretrained(src, dtype=torch.float32)
            model.save_pretrained(dst, max_shard_size=SHARD)
            if "sync" in extra:
                _fsync_tree(dst)

    else:

        def op() -> None:
            dst.mkdir()
            for file in sorted(src.iterdir()):
                shutil.copyfile(file, dst / file.name)
            if "sync" in extra:
                _fsync_tree(dst)

    baseline = memory()
    start = time.perf_counter()
    op()
    print(json.dumps({"seconds": time.perf_counter() - start, "baseline": baseline}))


def run_child(kind: str, src: Path, dst: Path, extra: list[str]) -> dict[str, float]:
    """Run :func:`child` in a fresh process, sampling its ``RssAnon`` and ``VmRSS`` every 2 ms."""
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072", "PYTHONWARNINGS": "ignore"}
    command = [sys.executable, __file__, "--child", kind, str(src), str(dst), json.dumps(extra)]
    start = time.perf_counter()
    proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    anon = rss = 0
    while proc.poll() is None:
        anon, rss = (max(a, b) for a, b in zip((anon, rss), memory(proc.pid) or (0, 0)))
        time.sleep(0.002)
    wall = time.perf_counter() - start
    out, err = proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"{kind} {extra} failed ({proc.returncode}):\n{err}")
    result = json.loads(out.strip().splitlines()[-1])
    base_anon, base_rss = result["baseline"]
    return {"seconds": result["seconds"], "process": wall, "anon": max(0, anon - base_anon), "rss": max(0, rss - base_rss)}


# -- the input ----------------------------------------------------------------------


def build(directory: Path) -> tuple[Path, Path]:
    """The Hugging Face checkpoint and its DCP copy (for (b))."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    import sdtree.checkpoint

    src, dcp = directory / "src-hf", directory / "src-dcp"
    config = LlamaConfig(
        hidden_size=DIM, intermediate_size=FFN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS, vocab_size=VOCAB, tie_word_embeddings=False,
    )  # fmt: skip
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(src, max_shard_size=SHARD)
    sdtree.checkpoint.convert(src, dcp)
    return src, dcp


def settle(timeout: float = 30.0) -> None:
    """Flush what the last run left (its removal: the journal commit and the
    discards of the freed blocks), wait until the kernel holds no dirty or
    in-flight pages, then a second more (ext4 issues discards after the
    commit, without waiting): so no run's writes or fsync pay for the last's."""
    os.sync()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with open("/proc/meminfo") as meminfo:
            fields = dict(line.split(":", 1) for line in meminfo)
        if sum(int(fields[k].split()[0]) for k in ("Dirty", "Writeback")) * 1024 < 16 * MIB:
            break
        time.sleep(0.1)
    time.sleep(1.0)


def warm(*paths: Path) -> None:
    """Read every file once, so each round finds them in the page cache."""
    for path in paths:
        for file in sorted(path.iterdir()):
            with open(file, "rb") as f:
                while f.read(1 << 24):
                    pass


def planned(src: Path, recipe: bool, to: str) -> tuple[int, int]:
    """``(the bytes of the largest group, sdtree's planned peak)`` of a
    conversion, from its dry run: a group is a tensor copied as it is, or a
    fused output and its sources; the planned peak leaves out sources that
    are mapped from the file (see ``sdtree.checkpoint.PlannedTensor``)."""
    from sdtree.checkpoint import convert, open_checkpoint
    from sdtree.checkpoint._lazy import tensor_items
    from sdtree.recipes import llama

    sizes = {key: t.numel() * t.element_size() for key, t in tensor_items(open_checkpoint(src).tree)}
    transform = llama.hf_to_torchtitan(n_heads=HEADS, n_kv_heads=KV_HEADS, dim=DIM, fuse_qkv=True, fuse_w13=True) if recipe else None
    plan = convert(src, src.parent / "unused", transform=transform, to=to, dry_run=True)  # type: ignore[arg-type]
    group = max(p.dtype.itemsize * math.prod(p.shape) + (sum(sizes[s] for s in p.sources) if p.rules else 0) for p in plan.plan)
    return group, plan.peak_bytes


# -- checking the outputs --------------------------------------------------------


def check(variant: str, src: Path, dst: Path) -> None:
    """The output loads and holds what it should: every key of the source,
    or the fused torchtitan keys; equal values where nothing was fused."""
    import torch

    from sdtree.checkpoint import open_checkpoint

    source = open_checkpoint(src)
    out = open_checkpoint(dst)
    keys = _flat_keys(out.tree)
    if variant.startswith("(c)"):
        wanted = {f"layers.{i}.attention.wqkv.weight" for i in range(LAYERS)} | {f"layers.{i}.feed_forward.w13.weight" for i in range(LAYERS)}
        assert wanted <= set(keys), f"{variant}: missing {sorted(wanted - set(keys))[:3]}"
        wqkv = keys["layers.0.attention.wqkv.weight"]
        assert tuple(wqkv.shape) == ((HEADS + 2 * KV_HEADS) * DIM // HEADS, DIM), wqkv.shape
        assert tuple(keys["layers.0.feed_forward.w13.weight"].shape) == (2 * FFN, DIM)
        assert not any("q_proj" in k or "gate_proj" in k for k in keys)
        emb = out.fetch(keys["tok_embeddings.weight"])
        assert torch.equal(emb, source.fetch(source.tree["model.embed_tokens.weight"]))
        return
    reference = _flat_keys(source.tree)
    assert set(keys) == set(reference), f"{variant}: keys differ: {sorted(set(keys) ^ set(reference))[:3]}"
    for key, leaf in reference.items():
        assert tuple(keys[key].shape) == tuple(leaf.shape) and keys[key].dtype == leaf.dtype, key
    for key in ("model.embed_tokens.weight", "model.layers.0.mlp.up_proj.weight", "lm_head.weight"):
        assert torch.equal(out.fetch(keys[key]), source.fetch(reference[key])), f"{variant}: {key} differs"


def _flat_keys(tree: Any) -> dict[str, Any]:
    import torch

    return {key: leaf for key, leaf in tree.items() if isinstance(leaf, torch.Tensor)}


# -- the run ------------------------------------------------------------------------------


@contextlib.contextmanager
def locked(lock: Optional[Path]) -> Iterator[None]:
    if lock is None:
        yield
        return
    with open(lock, "a") as file:
        fcntl.flock(file, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(file, fcntl.LOCK_UN)


def report(results: dict[str, list[dict[str, float]]], plans: dict[str, tuple[int, int]], size: int, rounds: int) -> None:
    def best(v: str) -> float:
        return min(r["seconds"] for r in results[v])

    def median(v: str, field: str = "seconds") -> float:
        return statistics.median(r[field] for r in results[v])

    def most(v: str, field: str) -> float:
        return max(r[field] for r in results[v])

    copy, synced = median("copy"), median("copy + fsync")
    hf, hf_synced = median("transformers load + save"), median("transformers + fsync")
    hf_anon = max(most(v, "anon") for v in ("transformers load + save", "transformers + fsync"))
    hf_rss = max(most(v, "rss") for v in ("transformers load + save", "transformers + fsync"))
    print(f"\nsource: Llama {LAYERS} layers, dim {DIM}, {HEADS}/{KV_HEADS} heads, ffn {FFN}, vocab {VOCAB}, fp32, "
          f"{size / MIB:.0f} MiB in 4 shards; {rounds} interleaved rounds; {os.cpu_count()} CPUs; page cache warm")  # fmt: skip
    print("seconds: the operation after the child's imports (process: the whole child, imports included, median);")
    print("ratios of medians; memory: the most of any round above the child's imports, MiB; group: the largest")
    print("group's bytes (sources and outputs); planned: sdtree's dry-run peak (mapped sources left out)")
    print(f"{'variant':38} {'best':>6} {'median':>6} {'process':>7} {'/copy':>6} {'/copy+fsync':>11} "
          f"{'/tf':>5} {'/tf+fsync':>9} {'RssAnon':>7} {'VmRSS':>6} {'group':>6} {'planned':>7}")  # fmt: skip
    for v in results:
        m = median(v)
        group = f"{plans[v][0] / MIB:6.0f} {plans[v][1] / MIB:7.0f}" if v in plans else ""
        print(f"{v:38} {best(v):6.2f} {m:6.2f} {median(v, 'process'):7.2f} {m / copy:6.2f} {m / synced:11.2f} "
              f"{m / hf:5.2f} {m / hf_synced:9.2f} {most(v, 'anon') / MIB:7.0f} {most(v, 'rss') / MIB:6.0f} {group}")  # fmt: skip
    print(f"\ntransformers: RssAnon {hf_anon / MIB:.0f} MiB, VmRSS {hf_rss / MIB:.0f} MiB above its imports: its "
          "parameters are views of the mmapped shards (file pages, not anonymous memory), and save_pretrained "
          "writes from them")  # fmt: skip
    print("targets (medians; sdtree fsyncs by default, so it is set against copy + fsync and transformers + fsync, "
          "--no-sync against copy and transformers):")  # fmt: skip
    for v, (kind, _, extra) in VARIANTS.items():
        if kind != "sdtree" or v not in results:
            continue
        limit = 2.0 if v.startswith("(c)") else 1.5
        durable = "--no-sync" not in extra
        floor, floor_name = (synced, "copy + fsync") if durable else (copy, "copy")
        against, against_name = (hf_synced, "transformers + fsync") if durable else (hf, "transformers")
        anon, rss = most(v, "anon"), most(v, "rss")
        verdict = lambda ok: "met" if ok else "MISSED"  # noqa: E731
        print(
            f"  {v}: {median(v) / floor:.2f}x {floor_name} (<= {limit}: {verdict(median(v) / floor <= limit)}); "
            f"{median(v) / against:.2f}x {against_name} (< 1: {verdict(median(v) < against)}); "
            f"RssAnon {anon / MIB:.0f} <= group {plans[v][0] / MIB:.0f} + 64 MiB: {verdict(anon <= plans[v][0] + 64 * MIB)}, "
            f"<= planned {plans[v][1] / MIB:.0f} + 64 MiB: {verdict(anon <= plans[v][1] + 64 * MIB)}; "
            f"VmRSS {rss / MIB:.0f} <= transformers' / 4 = {hf_rss / 4 / MIB:.0f} MiB: {verdict(rss <= hf_rss / 4)} "
            f"(transformers' RssAnon, {hf_anon / MIB:.0f} MiB, leaves out its parameters, which are file pages: "
            "VmRSS is the measure that counts both)"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds of every variant (default 5)")
    parser.add_argument("--dir", type=Path, default=None, help="work directory (default: a temporary one in /tmp)")
    parser.add_argument("--lock", type=Path, default=None, help="flock this file while building and during each round")
    parser.add_argument("--only", action="append", default=None, help="of sdtree's variants, run only this one (repeatable)")
    parser.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        kind, src, dst, extra = args.child
        child(kind, Path(src), Path(dst), json.loads(extra))
        return
    directory = Path(args.dir or tempfile.mkdtemp(prefix="bench_hf_"))
    directory.mkdir(parents=True, exist_ok=True)
    variants = {v: spec for v, spec in VARIANTS.items() if args.only is None or v in args.only or spec[0] != "sdtree"}
    try:
        with locked(args.lock):
            start = time.perf_counter()
            src, dcp = directory / "src-hf", directory / "src-dcp"
            if not (args.dir and src.is_dir() and dcp.is_dir()):  # a --dir kept from an earlier run is reused
                src, dcp = build(directory)
            size = sum(p.stat().st_size for p in src.iterdir())
            print(f"built {src} ({sorted(p.name for p in src.iterdir())}, {size / MIB:.0f} MiB) and {dcp} "
                  f"in {time.perf_counter() - start:.0f} s")  # fmt: skip
            plans = {
                v: planned(src if source == "hf" else dcp, v.startswith("(c)"), "hf" if "hf" in extra else "dcp")
                for v, (kind, source, extra) in variants.items()
                if kind == "sdtree"
            }
            warm(src, dcp)
            settle()
        results: dict[str, list[dict[str, float]]] = {v: [] for v in variants}
        names = list(variants)
        for round_ in range(args.rounds):
            with locked(args.lock):
                # each round starts one variant later, so that no variant always follows the same one
                for v in names[round_ % len(names) :] + names[: round_ % len(names)]:
                    kind, source, extra = variants[v]
                    dst = directory / "out"
                    if dst.exists():  # left by an interrupted run
                        shutil.rmtree(dst)
                    results[v].append(run_child(kind, src if source == "hf" else dcp, dst, extra))
                    if round_ == 0 and kind != "copy":
                        check(v, src, dst)
                    shutil.rmtree(dst)
                    settle()
            line = ", ".join(f"{v.split(' ')[0]} {r[-1]['seconds']:.2f}" for v, r in results.items())
            print(f"round {round_ + 1}: {line}", flush=True)
        print("outputs checked (round 1): keys, shapes and dtypes; values of some tensors; fused wqkv and w13 for (c)")
        report(results, plans, size, args.rounds)
    finally:
        if args.dir is None:
            shutil.rmtree(directory, ignore_errors=True)


if __name__ == "__main__":
    main()
