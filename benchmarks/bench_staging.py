"""Benchmark: ``sdtree.Stager.stage`` against the raw copy it does.

Input: 1 GB of CPU fp32 tensors, as (i) 1,000 tensors of 1 MB and (ii) 10
tensors of 100 MB, in a flat state dict.

- stage: ``Stager(sd).stage(sd)``, the mirror built once before timing
  (checks every leaf against the mirror's layout, then copies);
- foreach_copy_: ``torch._foreach_copy_`` of the same tensors into
  preallocated buffers (the floor: the copy and nothing else);
- DefaultStager (reference): torch's ``DefaultStager`` with every CUDA
  option off (synchronous, unpinned), which caches its copies too.

Time: interleaved rounds (the variants alternate), best and median; the
ratio is of medians. Target: stage within 1.2x of foreach_copy_.

CUDA (where it is): 4 GB staged from CUDA into the pinned mirror, against one
pinned ``copy_`` of the same bytes. Target: 80% of its bandwidth or more.

Tied weights: a state dict whose tensors are views of a few storages
(tied embedding and head, fused q/k/v split in three): the bytes one stage
copies against the bytes of every tensor copied on its own.

Run: make bench   (or: .venv/bin/python benchmarks/bench_staging.py [--rounds 9] [--gb 1])
"""

from __future__ import annotations

import argparse
import gc
import statistics
import time
import warnings
from typing import Any, Callable

import torch

import sdtree

MB = 1_000_000


def timed(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def rounds(variants: dict[str, Callable[[], Any]], n: int) -> dict[str, list[float]]:
    for fn in variants.values():  # warm-up: page in the buffers, build torch's caches
        fn()
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(n):
        for name, fn in variants.items():
            times[name].append(timed(fn))
    return times


def row(case: str, name: str, times: list[float], floor: list[float]) -> str:
    med, best = statistics.median(times), min(times)
    ratio = med / statistics.median(floor)
    return f"| {case} | {name} | {best * 1e3:8.1f} | {med * 1e3:8.1f} | {ratio:5.2f}x |"


def bench_copy(count: int, gb: float, n: int, with_default: bool) -> list[str]:
    numel = int(gb * 1e9 / 4 / count)
    sd = {f"layers.{i}.weight": torch.randn(numel) for i in range(count)}
    case = f"{count:,} x {numel * 4 / MB:,.0f} MB"
    stager = sdtree.Stager(sd)
    dst = [torch.empty_like(t) for t in sd.values()]
    src = list(sd.values())
    variants: dict[str, Callable[[], Any]] = {
        "foreach_copy_": lambda: torch._foreach_copy_(dst, src),
        "Stager.stage": lambda: stager.stage(sd),
    }
    times = rounds(variants, n)
    out = [row(case, name, t, times["foreach_copy_"]) for name, t in times.items()]
    assert all(torch.equal(a, b) for a, b in zip(stager.wait().values(), src))
    if with_default:
        del dst, variants
        stager.close()
        del stager
        gc.collect()
        from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            default = DefaultStager(StagingOptions(False, False, False, False))
            t = rounds({"DefaultStager": lambda: default.stage(sd)}, n)["DefaultStager"]
            default.close()
        out.append(row(case, "DefaultStager (torch)", t, times["foreach_copy_"]))
    return out


def bench_tied() -> list[str]:
    vocab, dim, layers = 32000, 512, 8
    embed = torch.randn(vocab, dim)
    sd: dict[str, torch.Tensor] = {"embed.weight": embed, "head.weight": embed}  # tied
    for i in range(layers):
        qkv = torch.randn(3 * dim, dim)
        q, k, v = qkv.split(dim)
        sd.update({f"layers.{i}.wq": q, f"layers.{i}.wk": k, f"layers.{i}.wv": v, f"layers.{i}.wqkv": qkv})
    naive = sum(t.numel() * t.element_size() for t in sd.values())
    stager = sdtree.Stager(sd)
    mirror = stager.stage(sd)
    assert isinstance(mirror, dict) and all(torch.equal(mirror[k], v) for k, v in sd.items())
    once = sum(s.nbytes() for s in {t.untyped_storage().data_ptr(): t.untyped_storage() for t in sd.values()}.values())
    return [
        f"tied weights ({len(sd)} tensors over {layers + 1} storages): stage copies "
        f"{stager.bytes_per_stage / MB:.1f} MB; each tensor on its own: {naive / MB:.1f} MB; "
        f"the storages: {once / MB:.1f} MB"
    ]


def bench_cuda(gb: float, n: int) -> list[str]:
    """Stage ``gb`` GB (100 tensors) from CUDA into the pinned mirror, against
    one pinned ``copy_`` of the same bytes; bandwidth of the medians."""
    count = 100
    numel = int(gb * 1e9 / 4 / count)
    sd = {f"layers.{i}.weight": torch.randn(numel, device="cuda") for i in range(count)}
    flat = torch.randn(numel * count, device="cuda")
    pinned = torch.empty(flat.shape, dtype=flat.dtype, pin_memory=True)
    stager = sdtree.Stager(sd)

    def one_copy() -> None:
        pinned.copy_(flat, non_blocking=True)
        torch.cuda.synchronize()

    def stage() -> None:
        stager.stage(sd)
        stager.wait()

    times = rounds({"one pinned copy_": one_copy, "Stager.stage + wait": stage}, n)
    nbytes = numel * count * 4
    out = []
    floor = statistics.median(times["one pinned copy_"])
    for name, t in times.items():
        med = statistics.median(t)
        out.append(
            f"| CUDA -> pinned, {gb:g} GB as {count} tensors | {name} | {min(t) * 1e3:8.1f} | {med * 1e3:8.1f} | "
            f"{nbytes / med / 1e9:.1f} GB/s = {floor / med:.0%} of one copy_ |"
        )
    stager.close()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--gb", type=float, default=1.0)
    parser.add_argument("--no-default-stager", action="store_true", help="skip torch's DefaultStager")
    parser.add_argument("--cuda-gb", type=float, default=4.0, help="GB staged from CUDA, where CUDA is (default 4)")
    parser.add_argument("--no-cuda", action="store_true", help="skip the CUDA measure")
    args = parser.parse_args()
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; {args.rounds} interleaved rounds; ms")
    print("| tensors | variant | best | median | / foreach_copy_ (median) |")
    print("|---|---|---:|---:|---:|")
    for count in (1000, 10):
        for line in bench_copy(count, args.gb, args.rounds, not args.no_default_stager):
            print(line, flush=True)
        gc.collect()
    if torch.cuda.is_available() and not args.no_cuda:
        for line in bench_cuda(args.cuda_gb, args.rounds):
            print(line, flush=True)
    for line in bench_tied():
        print(line)


if __name__ == "__main__":
    main()
