"""Consolidate a sharded DCP checkpoint into one file: sdtree vs torch.

Builds a DCP checkpoint of ``--gib`` GiB (default 1) saved by two gloo
processes, each writing its own shard file of every tensor (DTensors,
``Shard(0)``), then converts it to one file, each conversion in a fresh
process:

- torch: ``torch.distributed.checkpoint.format_utils.dcp_to_torch_save``
  (loads the whole checkpoint, then ``torch.save``);
- sdtree: ``sdtree.checkpoint.convert`` to a ``torch.save`` file and to a
  safetensors file (one tensor at a time).

Reports wall time of the conversion and the process's peak resident memory
(``getrusage(RUSAGE_SELF).ru_maxrss`` at exit; "baseline" is a process that
only imports torch and sdtree), best of ``--repeat`` interleaved runs, with
ratios to torch; then checks that all outputs hold the same tensors.

    python benchmarks/bench_checkpoint.py [--gib 1] [--repeat 2] [--dir DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

TENSOR_ROWS, TENSOR_COLS = 4096, 4096  # 64 MiB per fp32 tensor
VARIANTS = {
    "torch dcp_to_torch_save": "ckpt-torch.pt",
    "sdtree convert -> torch.save": "ckpt-sdtree.pt",
    "sdtree convert -> safetensors": "ckpt-sdtree.safetensors",
}


# -- building the input -----------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _save_shards(rank: int, world_size: int, port: int, path: str, count: int) -> None:
    """One rank of the save: local shards of ``count`` row-sharded fp32 tensors, plus a few small ones."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Shard

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    mesh = init_device_mesh("cpu", (world_size,))
    generator = torch.Generator().manual_seed(rank)
    rows = TENSOR_ROWS // world_size
    model = {}
    for i in range(count):
        local = torch.randn(rows, TENSOR_COLS, generator=generator)
        model[f"layers.{i}.weight"] = DTensor.from_local(local, mesh, [Shard(0)], run_check=False)
        model[f"layers.{i}.norm"] = DTensor.from_local(torch.ones(8, dtype=torch.bfloat16), mesh, [Shard(0)], run_check=False)
    dcp.save({"model": model}, checkpoint_id=path)
    dist.destroy_process_group()


def build(path: Path, gib: float) -> None:
    import torch.multiprocessing as mp

    count = max(1, round(gib * 1024 / 64))
    mp.spawn(_save_shards, args=(2, _free_port(), str(path), count), nprocs=2, join=True)


# -- one measured conversion (run in a fresh process) ------------------------------


def measure(variant: str, src: Path, dst: Path) -> dict[str, float]:
    import warnings

    import sdtree.checkpoint

    warnings.simplefilter("ignore")  # torch warns that no process group is up
    start = time.perf_counter()
    if variant == "torch dcp_to_torch_save":
        from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

        dcp_to_torch_save(src, dst)
    elif variant.startswith("sdtree"):
        sdtree.checkpoint.convert(src, dst)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    return {"seconds": seconds, "peak_bytes": peak}


def _run_measured(variant: str, src: Path, dst: Path) -> dict[str, float]:
    if dst.exists():
        os.remove(dst)
    out = subprocess.run(
        [sys.executable, __file__, "--measure", variant, "--src", str(src), "--dst", str(dst)],
        check=True,
        capture_output=True,
        text=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


# -- checking and reporting -------------------------------------------------------


def check(directory: Path) -> None:
    from safetensors.torch import load_file

    reference = torch.load(directory / VARIANTS["torch dcp_to_torch_save"], weights_only=True)["model"]
    ours = torch.load(directory / VARIANTS["sdtree convert -> torch.save"], weights_only=True)["model"]
    assert list(ours) == list(reference) and all(torch.equal(ours[k], reference[k]) for k in reference)
    del ours
    flat = load_file(directory / VARIANTS["sdtree convert -> safetensors"])
    assert sorted(flat) == sorted(reference) and all(torch.equal(flat[k], reference[k]) for k in reference)


def report(results: dict[str, list[dict[str, float]]], baseline: float, size: int) -> None:
    torch_time = min(r["seconds"] for r in results["torch dcp_to_torch_save"])
    torch_peak = max(r["peak_bytes"] for r in results["torch dcp_to_torch_save"])
    mib = 1024 * 1024
    print(f"\ninput: DCP checkpoint, 2 shard files, {size / mib:.0f} MiB; {os.cpu_count()} CPUs")
    print(f"{'variant':32} {'wall s':>7} {'peak RSS MiB':>13} {'time / torch':>13} {'peak / torch':>13}")
    for variant, runs in results.items():
        seconds = min(r["seconds"] for r in runs)
        peak = max(r["peak_bytes"] for r in runs)
        print(f"{variant:32} {seconds:7.2f} {peak / mib:13.0f} {seconds / torch_time:13.2f} {peak / torch_peak:13.2f}")
    print(f"{'baseline (imports only)':32} {'':7} {baseline / mib:13.0f}")
    extra = {v: max(r["peak_bytes"] for r in runs) - baseline for v, runs in results.items()}
    torch_extra = extra["torch dcp_to_torch_save"]
    for variant, more in extra.items():
        print(f"  above baseline: {variant:32} {more / mib:7.0f} MiB  ({more / torch_extra:.2f} of torch's)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gib", type=float, default=1.0, help="checkpoint size in GiB (default 1)")
    parser.add_argument("--repeat", type=int, default=2, help="runs of each variant (default 2)")
    parser.add_argument("--dir", type=Path, default=None, help="work directory (default: a temporary one)")
    parser.add_argument("--measure", help=argparse.SUPPRESS)
    parser.add_argument("--src", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--dst", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(args.measure, args.src, args.dst)))
        return
    directory = Path(args.dir or tempfile.mkdtemp(prefix="bench_checkpoint_"))
    directory.mkdir(parents=True, exist_ok=True)
    try:
        src = directory / "dcp"
        start = time.perf_counter()
        build(src, args.gib)
        size = sum(p.stat().st_size for p in src.iterdir())
        print(f"built {src}: {sorted(p.name for p in src.iterdir())}, {size / 2**20:.0f} MiB in {time.perf_counter() - start:.1f} s")
        baseline = _run_measured("baseline", src, directory / "unused")["peak_bytes"]
        results: dict[str, list[dict[str, float]]] = {v: [] for v in VARIANTS}
        for _ in range(args.repeat):
            for variant, name in VARIANTS.items():
                results[variant].append(_run_measured(variant, src, directory / name))
                print(f"  {variant}: {results[variant][-1]['seconds']:.2f} s, {results[variant][-1]['peak_bytes'] / 2**20:.0f} MiB")
        check(directory)
        print("outputs checked: the same tensors, bit for bit")
        report(results, baseline, size)
    finally:
        if args.dir is None:
            shutil.rmtree(directory, ignore_errors=True)


if __name__ == "__main__":
    main()
