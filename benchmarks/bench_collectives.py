"""Benchmark: sdtree's collective paths against torch's, 2 gloo processes on CPU.

Shapes: (a) 1,024 tensors of 16 KiB, (b) 4 tensors of 64 MiB (float32).
- broadcast from rank 0 into a template: sdtree.broadcast_state_dict vs torch's
  _broadcast_state_dict vs one flat dist.broadcast of the same bytes;
- a broadcast_from_rank0 load (set_model_state_dict, full_state_dict) into a
  model whose parameters have those shapes: sdtree vs torch vs the same flat
  broadcast (sdtree receives into the parameters themselves);
- full-state-dict gather of the same shapes sharded Shard(0) (with and without
  cpu_offload): sdtree.gather_state_dict vs torch's _gather_state_dict vs one
  flat all_gather of the same bytes;
- get_state_dict / set_state_dict (full_state_dict) on an FSDP2 model of
  200 parameters with Adam: sdtree vs torch.
"flat, new buffer" is the same collective into a freshly allocated buffer, as
any call that returns new tensors must receive into (its pages are faulted
in during the transfer). "bare bucket" is what any bucketed implementation
that returns new tensors does at least, with no per-tensor work: the
metadata broadcast, one pack of all tensors on the sending side, one
collective into a new buffer (and, for the gather, the one copy that turns
rank-major gathered data into whole tensors).

Each variant of an operation runs once per round, the rounds interleaved
(7 rounds), so none pays alone for the process's first large allocations;
the table gives the best and the median round, and the ratios use the
median (the best is shown too: on a 2-core VM one quiet round can halve a
time). Templates are built before the clock starts (they are the input).
Peak extra memory: the highest resident set size sampled (every ms) during
one more call, minus the size before it, on the rank where it is highest
(the times come from runs without the sampler, whose wake-ups tax
Python-heavy code).

Targets: (a) >= 20x faster than torch, (b) no slower, both within 2x of the
flat collective; FSDP2 get/set >= 10x faster than torch.

Run: .venv/bin/python benchmarks/bench_collectives.py
"""

from __future__ import annotations

import socket
import statistics
import sys
import time
import warnings

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from _rss import peak_extra_rss
from sdtree._collectives import all_gather_single  # torch 2.13 renamed all_gather_into_tensor

KIB, MIB = 1024, 1024 * 1024


def measure_rounds(fns: dict, reps: int = 7) -> dict:
    """(best seconds, median seconds, peak extra RSS) of each of ``fns``, run
    in interleaved rounds so that no one pays alone for the process's first
    large allocations."""
    runs: dict = {label: [] for label in fns}
    for _ in range(reps):
        for label, fn in fns.items():
            runs[label].append(timed(fn))
    return {label: (min(t), statistics.median(t), peak_memory(fns[label])) for label, t in runs.items()}


def measure(fn, reps: int = 7):
    """(best seconds, median seconds, peak extra RSS bytes of one more run); all ranks call it."""
    t = [timed(fn) for _ in range(reps)]
    return min(t), statistics.median(t), peak_memory(fn)


def timed(fn) -> float:
    """Seconds of one call of ``fn`` on the slowest rank (no sampler running:
    its wake-ups would tax Python-heavy code for the GIL)."""
    dist.barrier()
    start = time.perf_counter()
    fn()
    t = torch.tensor([time.perf_counter() - start])
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.item()


def peak_memory(fn) -> int:
    """The highest RSS sampled (every ms) during one call of ``fn``, minus the
    RSS before it, on the rank where that is largest."""
    dist.barrier()
    _, extra = peak_extra_rss(fn)
    worst = torch.tensor([extra], dtype=torch.float64)
    dist.all_reduce(worst, op=dist.ReduceOp.MAX)  # the rank that needed the most
    return int(worst.item())


def shapes(kind: str):
    if kind == "a":
        return [(4 * KIB,)] * 1024  # 16 KiB of float32 each
    return [(16 * MIB,)] * 4  # 64 MiB each


def body(rank: int, world: int, port: int, out_queue) -> None:
    warnings.simplefilter("ignore")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    from torch.distributed import _state_dict_utils as torch_utils
    from torch.distributed.checkpoint import state_dict as dsd
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    import sdtree

    mesh = init_device_mesh("cpu", (world,))
    cpu = torch.device("cpu")
    rows = []
    for kind in ("a", "b"):
        full = {f"t{i}": torch.full(s, float(i)) for i, s in enumerate(shapes(kind))}
        nbytes = sum(t.numel() * 4 for t in full.values())
        flat = torch.empty(nbytes // 4)

        # broadcast into a plain template (built once: it is the input, and
        # both utilities only replace its values)
        ours_local = {k: torch.empty(0) for k in full}
        torch_local = {k: torch.empty(0) for k in full}
        leaves = list(full.values())
        header = {k: (tuple(t.shape), t.dtype) for k, t in full.items()}

        def ours_b():
            sdtree.broadcast_state_dict(full if rank == 0 else {}, ours_local, cpu)

        def torch_b():
            torch_utils._broadcast_state_dict(full if rank == 0 else {}, torch_local, cpu)

        def flat_b():
            dist.broadcast(flat, src=0)

        def flat_fresh_b():  # what any receiver of new tensors pays too: memory allocated (and faulted in) anew
            dist.broadcast(flat if rank == 0 else torch.empty(nbytes // 4), src=0)

        def bare_b():  # metadata, one pack, one broadcast into a new buffer; no per-tensor work
            dist.broadcast_object_list([header if rank == 0 else None], src=0)
            packed = torch._C._nn.flatten_dense_tensors(leaves) if rank == 0 else torch.empty(nbytes // 4)
            dist.broadcast(packed, src=0)

        results = measure_rounds(
            {
                "broadcast sdtree": ours_b,
                "broadcast torch": torch_b,
                "broadcast flat": flat_b,
                "broadcast flat, new buffer": flat_fresh_b,
                # (b): every tensor is a bucket of its own, so "flat, new buffer" is the floor
                **({"broadcast bare bucket": bare_b} if kind == "a" else {}),
            }
        )
        rows.extend((kind, label, *value) for label, value in results.items())

        # a broadcast_from_rank0 load into a model whose parameters have these shapes
        def model():
            module = torch.nn.Module()
            for key, tensor in full.items():
                module.register_parameter(key, torch.nn.Parameter(torch.zeros_like(tensor)))
            return module

        ours_model, torch_model = model(), model()
        opts = sdtree.StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
        topts = dsd.StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
        loads = {
            "load sdtree": lambda: sdtree.set_model_state_dict(ours_model, full if rank == 0 else {}, options=opts),
            "load torch": lambda: dsd.set_model_state_dict(torch_model, dict(full) if rank == 0 else {}, options=topts),
            "load flat": flat_b,
        }
        rows.extend((kind, label, *value) for label, value in measure_rounds(loads).items())
        for loaded in (ours_model, torch_model):
            assert all(torch.equal(loaded.get_parameter(k), v) for k, v in full.items())
        del ours_model, torch_model

        sharded = {k: distribute_tensor(v, mesh, [Shard(0)]) for k, v in full.items()}
        shard_flat = torch.empty(nbytes // 4 // world)
        gathered = torch.empty(nbytes // 4)
        fns = {}
        for offload in (False, True):
            suffix = " +cpu_offload" if offload else ""
            fns["gather sdtree" + suffix] = lambda offload=offload: sdtree.gather_state_dict(sharded, cpu_offload=offload)
            fns["gather torch" + suffix] = lambda offload=offload: torch_utils._gather_state_dict(sharded, cpu_offload=offload)
        fns["gather flat"] = lambda: all_gather_single(gathered, shard_flat)
        fns["gather flat, new buffer"] = lambda: all_gather_single(torch.empty(nbytes // 4), shard_flat)
        locals_ = [t._local_tensor for t in sharded.values()]
        n, length = len(locals_), locals_[0].numel()

        def bare_g():  # one pack, one all_gather into a new buffer, one rank-major -> tensor-major copy
            recv = torch.empty(world, n * length)
            all_gather_single(recv.view(-1), torch._C._nn.flatten_dense_tensors(locals_))
            recv.view(world, n, length).transpose(0, 1).contiguous()

        if kind == "a":
            fns["gather bare bucket"] = bare_g
        rows.extend((kind, label, *value) for label, value in measure_rounds(fns).items())

    # FSDP2 model of 200 parameters, Adam
    from torch import nn
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(32, 32) for _ in range(100)])
    for layer in model:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    optim = torch.optim.Adam(model.parameters(), lr=1e-3)
    model(torch.randn(4, 32)).sum().backward()
    optim.step()
    opts = sdtree.StateDictOptions(full_state_dict=True)
    topts = dsd.StateDictOptions(full_state_dict=True)
    msd, osd = sdtree.get_state_dict(model, optim, options=opts)
    rows.append(("fsdp2", "get_state_dict sdtree", *measure(lambda: sdtree.get_state_dict(model, optim, options=opts))))
    rows.append(("fsdp2", "get_state_dict torch", *measure(lambda: dsd.get_state_dict(model, optim, options=topts))))
    rows.append(("fsdp2", "set_state_dict sdtree", *measure(lambda: sdtree.set_state_dict(model, optim, model_state_dict=msd, optim_state_dict=osd, options=opts))))
    rows.append(("fsdp2", "set_state_dict torch", *measure(lambda: dsd.set_state_dict(model, optim, model_state_dict=dict(msd), optim_state_dict=osd, options=topts))))
    if rank == 0:
        out_queue.put(rows)
    dist.destroy_process_group()


def main() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=body, args=(r, 2, port, q)) for r in range(2)]
    for p in procs:
        p.start()
    rows = q.get()
    for p in procs:
        p.join()
    print(f"torch {torch.__version__}, 2 gloo processes on CPU; 7 interleaved rounds; peak extra RSS of the worst rank (a separate run)\n")
    print(f"{'shape':<6}{'operation':<30}{'best ms':>10}{'median ms':>11}{'peak MiB':>10}")
    best, median = {}, {}
    for kind, label, low, mid, mem in rows:
        best[(kind, label)], median[(kind, label)] = low, mid
        print(f"{kind:<6}{label:<30}{low * 1e3:>10.1f}{mid * 1e3:>11.1f}{mem / MIB:>10.1f}")

    def ratio(kind: str, num: str, den: str) -> str:
        return f"{median[(kind, num)] / median[(kind, den)]:5.2f}x ({best[(kind, num)] / best[(kind, den)]:4.2f}x)"

    print("\nratios of medians (of best rounds)")
    for kind in ("a", "b"):
        print(
            f"  ({kind}) {'load (set_model_state_dict)':<20}: torch/sdtree {ratio(kind, 'load torch', 'load sdtree')}"
            f"   sdtree/flat {ratio(kind, 'load sdtree', 'load flat')}"
        )
        ops = [("broadcast", "broadcast sdtree", "broadcast")]
        ops += [("gather" + suffix, "gather sdtree" + suffix, "gather") for suffix in ("", " +cpu_offload")]
        for name, ours, op in ops:
            theirs = ours.replace("sdtree", "torch")
            print(
                f"  ({kind}) {name:<20}: torch/sdtree {ratio(kind, theirs, ours)}"
                f"   sdtree/flat {ratio(kind, ours, op + ' flat')}"
                f"   sdtree/flat new buffer {ratio(kind, ours, op + ' flat, new buffer')}"
                + (f"   sdtree/bare bucket {ratio(kind, ours, op + ' bare bucket')}" if kind == "a" else "")
            )
    for op in ("broadcast", "gather"):
        print(f"  (a) {op} bare bucket/flat: {ratio('a', op + ' bare bucket', op + ' flat')}")
    for op in ("get_state_dict", "set_state_dict"):
        print(f"  fsdp2 {op}: torch/sdtree {ratio('fsdp2', f'{op} torch', f'{op} sdtree')}")

if __name__ == "__main__":
    sys.exit(main())
