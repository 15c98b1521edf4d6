"""Benchmark: sdtree's get/set against torch's and against plain state_dict().

Models of N Linear(16, 16) layers (2N parameters), Adam after one step.
Prints, per size, milliseconds for each operation and the ratios the targets
name, all measured in this run:

- get_model_state_dict within 1.5x of model.state_dict()
- get_optimizer_state_dict, set_optimizer_state_dict, set_model_state_dict
  at least 10x faster than torch's at 4,000 parameters
- every sdtree curve linear in parameters (us/param flat across sizes)

"set_optim" loads the optimizer's own state dict back into it (the optimizer
stepped once, as the targets say); "set_optim new" loads a deep copy (as a
resume from a checkpoint does) into a new optimizer with no state.

Run: .venv/bin/python benchmarks/bench_adapters.py [N ...]   (default 100 1000 2000 5000)
"""

from __future__ import annotations

import copy
import gc
import sys
import time
import warnings

import torch
from torch import nn
from torch.distributed.checkpoint import state_dict as dsd

import sdtree

warnings.simplefilter("ignore")


def setup(n: int):
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(16, 16) for _ in range(n)])
    optim = torch.optim.Adam(model.parameters(), lr=1e-3)
    model(torch.randn(2, 16)).sum().backward()
    optim.step()
    optim.zero_grad()
    return model, optim


def timed(fn, budget: float = 0.5, max_reps: int = 5, prepare=None) -> float:
    """Best time of ``fn(prepare())`` (or ``fn()``), untimed preparation, over a few runs."""
    best = float("inf")
    spent = 0.0
    reps = 0
    while reps < max_reps and (reps == 0 or spent < budget):
        arg = prepare() if prepare else None
        gc.collect()
        start = time.perf_counter()
        fn(arg) if prepare else fn()
        took = time.perf_counter() - start
        best = min(best, took)
        spent += took
        reps += 1
    return best


def run(n: int) -> dict[str, float]:
    model, optim = setup(n)
    msd = sdtree.get_model_state_dict(model)
    osd = sdtree.get_optimizer_state_dict(model, optim)
    raw_msd, raw_osd = model.state_dict(), optim.state_dict()
    checkpoint = copy.deepcopy(osd)  # what a resume loads: tensors of its own

    def fresh_optim():
        return torch.optim.Adam(model.parameters(), lr=1e-3)

    t = {
        "model.state_dict": timed(model.state_dict),
        "sdtree get_model": timed(lambda: sdtree.get_model_state_dict(model)),
        "torch get_model": timed(lambda: dsd.get_model_state_dict(model)),
        "optim.state_dict": timed(optim.state_dict),
        "sdtree get_optim": timed(lambda: sdtree.get_optimizer_state_dict(model, optim)),
        "torch get_optim": timed(lambda: dsd.get_optimizer_state_dict(model, optim)),
        "model.load_state_dict": timed(lambda: model.load_state_dict(raw_msd), max_reps=2),
        "sdtree set_model": timed(lambda: sdtree.set_model_state_dict(model, msd)),
        "torch set_model": timed(lambda: dsd.set_model_state_dict(model, msd), max_reps=2),
        "optim.load_state_dict": timed(lambda: optim.load_state_dict(raw_osd), max_reps=2),
        "sdtree set_optim": timed(lambda: sdtree.set_optimizer_state_dict(model, optim, osd)),
        "torch set_optim": timed(lambda: dsd.set_optimizer_state_dict(model, optim, osd), max_reps=2),
        "sdtree set_optim new": timed(lambda o: sdtree.set_optimizer_state_dict(model, o, checkpoint), prepare=fresh_optim),
        "torch set_optim new": timed(lambda o: dsd.set_optimizer_state_dict(model, o, checkpoint), prepare=fresh_optim, max_reps=2),
    }
    return t


def main(sizes: list[int]) -> None:
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; best-of times in ms\n")
    rows = {}
    for n in sizes:
        rows[n] = run(n)
    names = list(next(iter(rows.values())))
    header = f"{'operation':<22}" + "".join(f"{2 * n:>10}" for n in sizes) + "   (parameters)"
    print(header)
    for name in names:
        print(f"{name:<22}" + "".join(f"{rows[n][name] * 1e3:>10.2f}" for n in sizes))
    print("\nratios (sdtree vs reference, per size)")
    for label, ours, ref, better in (
        ("get_model / model.state_dict()", "sdtree get_model", "model.state_dict", "<= 1.5"),
        ("torch get_model / sdtree", "sdtree get_model", "torch get_model", None),
        ("torch get_optim / sdtree", "sdtree get_optim", "torch get_optim", ">= 10"),
        ("torch set_model / sdtree", "sdtree set_model", "torch set_model", ">= 10"),
        ("torch set_optim / sdtree", "sdtree set_optim", "torch set_optim", ">= 10"),
        ("  same, into a new optimizer", "sdtree set_optim new", "torch set_optim new", None),
    ):
        if label.startswith("get_model /"):
            vals = [rows[n][ours] / rows[n][ref] for n in sizes]
        else:
            vals = [rows[n][ref] / rows[n][ours] for n in sizes]
        target = f"  target {better}" if better else ""
        print(f"{label:<34}" + "".join(f"{v:>9.2f}x" for v in vals) + target)
    print("\nus per parameter (linear = flat across sizes)")
    for name in names:
        print(f"{name:<22}" + "".join(f"{rows[n][name] / (2 * n) * 1e6:>10.2f}" for n in sizes))


if __name__ == "__main__":
    main([int(a) for a in sys.argv[1:]] or [100, 1000, 2000, 5000])
