"""Benchmark: sdtree's collective paths against torch's, 2 gloo processes on CPU.

Shapes (float32): (a) 1,024 tensors of 16 KiB, (a2) the same as 64 x 64
matrices, (m) 4 tensors of 4 MiB, (b) 4 tensors of 64 MiB.
- broadcast from rank 0 into a template: sdtree.broadcast_state_dict vs torch's
  _broadcast_state_dict vs one flat dist.broadcast of the same bytes;
- a broadcast_from_rank0 load (set_model_state_dict, full_state_dict) into a
  model whose parameters have those shapes: sdtree vs torch vs the same flat
  broadcast (sdtree receives into the parameters themselves);
- full-state-dict gather of the same shapes sharded Shard(0) (with and without
  cpu_offload): sdtree.gather_state_dict vs torch's _gather_state_dict vs one
  flat all_gather of the same bytes;
- gather into a preallocated destination vs one flat all_gather into a
  preallocated buffer: "planned" is what the stager's full_state_dict
  mirror does at each stage (a GatherPlan made once, called again), "gather
  into sdtree" the one-shot gather_into (it checks and plans every call),
  "stage" a whole Stager.stage (its checks on every rank, then the plan);
  "gather flat + copy" adds the one copy a bucket of small tensors needs
  (gathered rank-major, kept tensor-major): the floor for (a) and (a2);
- scatter load: broadcast_state_dict into Shard(0) DTensor templates
  (FSDP2's layout), sdtree vs torch vs one flat dist.scatter of the same
  bytes into a preallocated buffer, with the tensor bytes each rank
  receives (counted by wrapping dist.broadcast and dist.scatter);
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
(9 rounds, each in its own shuffled order, the same on every rank), so none
pays alone for the process's first large allocations, nor always follows
the same variant;
the table gives the best and the median round, and the ratios use the
median (the best is shown too: on a 2-core VM one quiet round can halve a
time). Templates are built before the clock starts (they are the input).
Peak extra memory: the highest resident set size sampled (every ms) during
one more call, minus the size before it, on the rank where it is highest
(the times come from runs without the sampler, whose wake-ups tax
Python-heavy code).

Targets (issue 14), printed with the ratios: broadcast and gather (a), (a2) >= 20x
faster than torch and within 2x of the flat collective into fresh memory;
(m) and (b) no slower than torch and within 1.5x of it; gather into a
destination within 1.25x of a flat all_gather into a preallocated buffer;
scatter load: bytes received per rank about size / world.

Run: .venv/bin/python benchmarks/bench_collectives.py [--shapes a,a2,m,b] [--no-fsdp2] [--rounds 9]
"""

from __future__ import annotations

import argparse
import queue
import random
import socket
import statistics
import sys
import time
import warnings

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from _rss import peak_extra_rss
# all_gather_single: torch 2.13's name for all_gather_into_tensor
from sdtree._collectives import all_gather_single, broadcast_object

KIB, MIB = 1024, 1024 * 1024


ROUNDS = 9  # set by --rounds (main passes it to each worker)


def measure_rounds(fns: dict) -> dict:
    """(best seconds, median seconds, peak extra RSS) of each of ``fns``, run
    in interleaved rounds so that no one pays alone for the process's first
    large allocations. Each round runs the variants in another order,
    shuffled by the round's number (the same on every rank): on this VM a
    call's time swings with the call before it (4 x 64 MiB gathers: 260 or
    500 ms), and in a fixed order, or a rotated one, each variant would
    always follow the same one."""
    runs: dict = {label: [] for label in fns}
    for r in range(ROUNDS):
        order = list(fns.items())
        random.Random(r).shuffle(order)
        for label, fn in order:
            runs[label].append(timed(fn))
    return {label: (min(t), statistics.median(t), peak_memory(fns[label])) for label, t in runs.items()}


def measure(fn):
    """(best seconds, median seconds, peak extra RSS bytes of one more run); all ranks call it."""
    t = [timed(fn) for _ in range(ROUNDS)]
    return min(t), statistics.median(t), peak_memory(fn)


def timed(fn) -> float:
    """Seconds of one call of ``fn`` on the slowest rank (no sampler running:
    its wake-ups would tax Python-heavy code for the GIL)."""
    dist.barrier()
    start = time.perf_counter()
    out = fn()
    t = torch.tensor([time.perf_counter() - start])
    del out  # after the clock: freeing what a call returns is not part of the call
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


def received_bytes(fn) -> int:
    """The tensor bytes this rank receives during one call of ``fn`` (what
    dist.broadcast brings to a rank other than 0, what dist.scatter brings
    to any rank but 0), the most of any rank."""
    saved = dist.broadcast, dist.scatter
    count = [0]
    me = dist.get_rank()

    def broadcast(tensor, *args, **kwargs):
        count[0] += tensor.numel() * tensor.element_size() if me != 0 else 0
        return saved[0](tensor, *args, **kwargs)

    def scatter(tensor, *args, **kwargs):
        count[0] += tensor.numel() * tensor.element_size() if me != 0 else 0
        return saved[1](tensor, *args, **kwargs)

    dist.barrier()
    dist.broadcast, dist.scatter = broadcast, scatter
    try:
        fn()
    finally:
        dist.broadcast, dist.scatter = saved
    most = torch.tensor([float(count[0])])
    dist.all_reduce(most, op=dist.ReduceOp.MAX)
    return int(most.item())


SMALL = ("a", "a2")  # many small tensors: the 20x / 2x targets


def shapes(kind: str):
    if kind == "a":
        return [(4 * KIB,)] * 1024  # 16 KiB of float32 each
    if kind == "a2":
        return [(64, 64)] * 1024  # the same bytes as matrices, as a model's weights are
    if kind == "m":
        return [(MIB,)] * 4  # 4 MiB each
    return [(16 * MIB,)] * 4  # 64 MiB each


def body(rank: int, world: int, port: int, out_queue, kinds: list, fsdp2: bool, rounds: int) -> None:
    global ROUNDS
    ROUNDS = rounds
    warnings.simplefilter("ignore")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    from torch.distributed import _state_dict_utils as torch_utils
    from torch.distributed.checkpoint import state_dict as dsd
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    import sdtree
    from sdtree.transforms.gather import GatherPlan, gather_into

    mesh = init_device_mesh("cpu", (world,))
    cpu = torch.device("cpu")
    rows = []
    counted = {}
    for kind in kinds:
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

        def bare_b():  # metadata (in one message), one pack, one broadcast into a new buffer; no per-tensor work
            broadcast_object(header if rank == 0 else None)
            packed = torch._C._nn.flatten_dense_tensors(leaves) if rank == 0 else torch.empty(nbytes // 4)
            dist.broadcast(packed, src=0)

        results = measure_rounds(
            {
                "broadcast sdtree": ours_b,
                "broadcast torch": torch_b,
                "broadcast flat": flat_b,
                "broadcast flat, new buffer": flat_fresh_b,
                # (m), (b): every tensor travels alone, so "flat, new buffer" is the floor
                **({"broadcast bare bucket": bare_b} if kind in SMALL else {}),
            }
        )
        rows.extend((kind, label, *value) for label, value in results.items())
        assert all(torch.equal(ours_local[k], v) for k, v in full.items())

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

        if kind in SMALL:
            fns["gather bare bucket"] = bare_g
        # into a preallocated destination (the stager's mirror)
        mirror = {k: torch.empty_like(v) for k, v in full.items()}
        fns["gather into sdtree"] = lambda: gather_into(sharded, mirror)
        # the stager's: its mirror gathered into by the plan it keeps (made once), and a whole stage()
        plan = GatherPlan(list(sharded.values()), list(mirror.values()))
        fns["gather into, planned"] = lambda: plan(list(sharded.values()))
        stager = sdtree.Stager(sharded, full_state_dict=True)
        fns["stage, full_state_dict"] = lambda: stager.stage(sharded)
        copy_to = [t.view(world, -1) for t in mirror.values()]
        gathered_rows = gathered.view(world, n, length)
        copy_from = [gathered_rows[:, j] for j in range(n)]

        def flat_copy_g():  # the floor of a bucket of small tensors: gather, then one copy into the mirror
            all_gather_single(gathered, shard_flat)
            torch._foreach_copy_(copy_to, copy_from)

        if kind in SMALL:
            fns["gather flat + copy"] = flat_copy_g
        rows.extend((kind, label, *value) for label, value in measure_rounds(fns).items())
        gather_into(sharded, mirror)
        assert all(torch.equal(mirror[k], v) for k, v in full.items())

        if kind not in SMALL:
            # scatter load: full tensors into Shard(0) DTensor templates (each rank keeps its rows)
            ours_t = {k: distribute_tensor(torch.zeros_like(v), mesh, [Shard(0)]) for k, v in full.items()}
            torch_t = {k: distribute_tensor(torch.zeros_like(v), mesh, [Shard(0)]) for k, v in full.items()}
            pieces = list(flat.chunk(world)) if rank == 0 else None

            def ours_s():
                sdtree.broadcast_state_dict(full if rank == 0 else {}, dict(ours_t), cpu)

            def torch_s():
                torch_utils._broadcast_state_dict(full if rank == 0 else {}, dict(torch_t), cpu)

            scatters = {
                "scatter sdtree": ours_s,
                "scatter torch": torch_s,
                "scatter flat": lambda: dist.scatter(shard_flat, pieces, src=0),
            }
            rows.extend((kind, label, *value) for label, value in measure_rounds(scatters).items())
            for label, fn in scatters.items():
                counted[(kind, label)] = received_bytes(fn)
            counted[(kind, "size / world")] = nbytes // world
            assert all(torch.equal(ours_t[k].full_tensor(), v) for k, v in full.items())

    if fsdp2:
        rows.extend(bench_fsdp2(mesh))
    if rank == 0:
        out_queue.put((rows, counted))
    dist.destroy_process_group()


def bench_fsdp2(mesh) -> list:
    """get/set_state_dict (full_state_dict) of an FSDP2 model of 200 parameters, Adam."""
    from torch import nn
    from torch.distributed.checkpoint import state_dict as dsd
    from torch.distributed.fsdp import fully_shard

    import sdtree

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
    return [
        ("fsdp2", "get_state_dict sdtree", *measure(lambda: sdtree.get_state_dict(model, optim, options=opts))),
        ("fsdp2", "get_state_dict torch", *measure(lambda: dsd.get_state_dict(model, optim, options=topts))),
        ("fsdp2", "set_state_dict sdtree", *measure(lambda: sdtree.set_state_dict(model, optim, model_state_dict=msd, optim_state_dict=osd, options=opts))),
        ("fsdp2", "set_state_dict torch", *measure(lambda: dsd.set_state_dict(model, optim, model_state_dict=dict(msd), optim_state_dict=osd, options=topts))),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="a,a2,m,b", help="comma-separated, of a, a2, m, b")
    parser.add_argument("--no-fsdp2", action="store_true", help="skip the FSDP2 get/set rows")
    parser.add_argument("--rounds", type=int, default=ROUNDS)
    args = parser.parse_args()
    kinds = [k for k in args.shapes.split(",") if k]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=body, args=(r, 2, port, q, kinds, not args.no_fsdp2, args.rounds)) for r in range(2)]
    for p in procs:
        p.start()
    while True:  # a rank that dies (a crash in torch or gloo) must fail the bench, not hang it
        try:
            rows, counted = q.get(timeout=1)
            break
        except queue.Empty:
            dead = [(r, p.exitcode) for r, p in enumerate(procs) if p.exitcode not in (None, 0)]
            if dead:
                for p in procs:
                    p.kill()
                print(f"bench_collectives: rank {dead[0][0]} exited with {dead[0][1]} before reporting; no results", file=sys.stderr)
                return 1
    for p in procs:
        p.join()
    print(f"torch {torch.__version__}, 2 gloo processes on CPU; {args.rounds} interleaved rounds; peak extra RSS of the worst rank (a separate run)\n")
    print(f"{'shape':<6}{'operation':<30}{'best ms':>10}{'median ms':>11}{'peak MiB':>10}")
    best, median = {}, {}
    for kind, label, low, mid, mem in rows:
        best[(kind, label)], median[(kind, label)] = low, mid
        print(f"{kind:<6}{label:<30}{low * 1e3:>10.1f}{mid * 1e3:>11.1f}{mem / MIB:>10.1f}")

    def ratio(kind: str, num: str, den: str) -> tuple[float, str]:
        value = median[(kind, num)] / median[(kind, den)]
        return value, f"{value:6.2f}x ({best[(kind, num)] / best[(kind, den)]:5.2f}x)"

    def check(kind: str, name: str, num: str, den: str, op: str, target: float) -> None:
        value, text = ratio(kind, num, den)
        ok = value >= target if op == ">=" else value <= target
        print(f"  ({kind}) {name:<44} {text}   target {op} {target:<5}  {'ok' if ok else 'MISSED'}")

    print("\nratios of medians (of best rounds), with issue 14's targets")
    for kind in kinds:
        fast, near = (20.0, 2.0) if kind in SMALL else (1.0, 1.5)
        for op in ("broadcast", "gather"):
            check(kind, f"{op}: torch / sdtree", f"{op} torch", f"{op} sdtree", ">=", fast)
            check(kind, f"{op}: sdtree / flat, new buffer", f"{op} sdtree", f"{op} flat, new buffer", "<=", near)
        for suffix in (" +cpu_offload",):
            _, text = ratio(kind, "gather torch" + suffix, "gather sdtree" + suffix)
            print(f"  ({kind}) {'gather' + suffix + ': torch / sdtree':<44} {text}")
        check(kind, "gather into, planned / flat (preallocated)", "gather into, planned", "gather flat", "<=", 1.25)
        for label in ("gather into sdtree", "stage, full_state_dict"):
            _, text = ratio(kind, label, "gather flat")
            print(f"  ({kind}) {label + ' / flat (preallocated)':<44} {text}")
        if kind in SMALL:
            _, text = ratio(kind, "gather flat + copy", "gather flat")
            print(f"  ({kind}) {'floor: gather flat + copy / flat':<44} {text}")
            _, text = ratio(kind, "gather into, planned", "gather flat + copy")
            print(f"  ({kind}) {'gather into, planned / floor (flat + copy)':<44} {text}")
            for op in ("broadcast", "gather"):
                _, text = ratio(kind, f"{op} bare bucket", f"{op} flat, new buffer")
                print(f"  ({kind}) {op + ': bare bucket / flat, new buffer':<44} {text}")
        _, text = ratio(kind, "load torch", "load sdtree")
        print(f"  ({kind}) {'load (set_model_state_dict): torch / sdtree':<44} {text}")
        _, text = ratio(kind, "load sdtree", "load flat")
        print(f"  ({kind}) {'load: sdtree / flat':<44} {text}")
        if kind not in SMALL:
            _, text = ratio(kind, "scatter torch", "scatter sdtree")
            print(f"  ({kind}) {'scatter load: torch / sdtree':<44} {text}")
            _, text = ratio(kind, "scatter sdtree", "scatter flat")
            print(f"  ({kind}) {'scatter load: sdtree / flat scatter':<44} {text}")
            share = counted[(kind, "size / world")]
            for label in ("scatter sdtree", "scatter torch", "scatter flat"):
                got = counted[(kind, label)]
                print(f"  ({kind}) {'bytes received per rank, ' + label:<44} {got / MIB:8.1f} MiB = {got / share:5.2f} x size / world")
    if not args.no_fsdp2:
        for op in ("get_state_dict", "set_state_dict"):
            _, text = ratio("fsdp2", f"{op} torch", f"{op} sdtree")
            print(f"  fsdp2 {op}: torch / sdtree {text}")


if __name__ == "__main__":
    sys.exit(main())
