"""Benchmark: a 5-step sdtree pipeline against hand-written dict comprehensions.

Model state dict:     strip_prefix >> rename(regex) >> select_keys >> offload_to_cpu
Optimizer state dict: param_ids_to_fqns >> strip_prefix >> rename(regex) >> select_keys
                      >> flatten_optimizer >> offload_to_cpu
Each is timed next to a hand-written version doing the same key work in the
same run (no validation, no collision checks), on CPU tensors.

Run: make bench   (or: .venv/bin/python benchmarks/bench_pipeline.py [N ...])
Target: at most 3x the hand-written code, and linear in keys (us/key flat).
Each is timed with Python's cyclic GC running (as users run it) and paused
(what the code itself costs): with 100,000 keys and 300,000 tensors alive,
full collections triggered by any allocation-heavy code grow with the heap.
"""

from __future__ import annotations

import gc
import re
import sys
import time

import torch

from sdtree import pipeline
from sdtree.testing import assert_state_dict_equal
from sdtree.transforms import (
    flatten_optimizer,
    offload_to_cpu,
    param_ids_to_fqns,
    rename,
    select_keys,
    strip_prefix,
)

PATTERN = re.compile(r"^layers\.(\d+)\.")
REPL = r"blocks.\1."


def make(n: int):
    names = [f"module.layers.{i // 2}.{'weight' if i % 2 == 0 else 'bias'}" for i in range(n)]
    names[-1] = "module.head.weight"
    t = torch.zeros(4)
    msd = {name: t for name in names}
    osd = {
        "state": {i: {"step": torch.tensor(1.0), "exp_avg": t, "exp_avg_sq": t} for i in range(n)},
        "param_groups": [
            {"lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.01, "params": list(range(n // 2))},
            {"lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.0, "params": list(range(n // 2, n))},
        ],
    }
    return names, msd, osd


def hand_model(msd):
    out = {}
    for key, value in msd.items():
        key = PATTERN.sub(REPL, key[len("module."):])
        if key.startswith("blocks."):
            out[key] = value.cpu()
    return out


def hand_optim(osd, ids):
    def fqn(i):
        return PATTERN.sub(REPL, ids[i][len("module."):])

    out = {}
    for i, entry in osd["state"].items():
        name = fqn(i)
        if name.startswith("blocks."):
            for k, v in entry.items():
                out[f"state.{name}.{k}"] = v.cpu() if isinstance(v, torch.Tensor) else v
    for group in osd["param_groups"]:
        hypers = [(k, v) for k, v in group.items() if k != "params"]
        for i in group["params"]:
            name = fqn(i)
            if name.startswith("blocks."):
                for k, v in hypers:
                    out[f"param_groups.{name}.{k}"] = v
    return out


def best(fn, *args, repeat, pause_gc):
    times = []
    for _ in range(repeat):
        gc.collect()
        if pause_gc:
            gc.disable()
        start = time.perf_counter()
        fn(*args)
        times.append(time.perf_counter() - start)
        gc.enable()
    return min(times)


def main(sizes):
    print(f"torch {torch.__version__}; best of several runs; us/key = microseconds per state-dict key\n")
    print(f"{'keys':>8} {'pipeline':<22} {'sdtree us/key':>14} {'hand us/key':>12} {'ratio':>7}")
    rows = []
    for n in sizes:
        names, msd, osd = make(n)
        ids = dict(enumerate(names))
        keys = strip_prefix("module.") >> rename([(PATTERN.pattern, REPL)]) >> select_keys("blocks.")
        model_pipe = keys >> offload_to_cpu()
        optim_pipe = pipeline(param_ids_to_fqns(ids), keys, flatten_optimizer(), offload_to_cpu())
        assert_state_dict_equal(model_pipe(msd), hand_model(msd))
        assert_state_dict_equal(optim_pipe(osd), hand_optim(osd, ids))
        repeat = 5 if n <= 20_000 else 3
        for label, ours, hand in (
            ("model", lambda: model_pipe(msd), lambda: hand_model(msd)),
            ("optimizer", lambda: optim_pipe(osd), lambda: hand_optim(osd, ids)),
        ):
            for pause_gc in (False, True):
                t_ours = best(ours, repeat=repeat, pause_gc=pause_gc)
                t_hand = best(hand, repeat=repeat, pause_gc=pause_gc)
                name = label + (" (gc paused)" if pause_gc else "")
                rows.append((n, name, t_ours / n * 1e6, t_hand / n * 1e6))
                print(f"{n:>8} {name:<22} {t_ours / n * 1e6:>14.2f} {t_hand / n * 1e6:>12.2f} {t_ours / t_hand:>6.2f}x")
    if len(sizes) > 1:
        print("\nlinearity (us/key at largest / us/key at smallest; 1.0 = linear):")
        for label in dict.fromkeys(r[1] for r in rows):
            mine = [r for r in rows if r[1] == label]
            print(f"  {label:<22} sdtree {mine[-1][2] / mine[0][2]:.2f}   hand {mine[-1][3] / mine[0][3]:.2f}")


if __name__ == "__main__":
    main([int(a) for a in sys.argv[1:]] or [10_000, 100_000])
