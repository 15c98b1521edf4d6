"""A pool of spawned worker processes (gloo, or NCCL with a GPU a rank) that runs many test bodies.

Starting gloo processes costs seconds; re-using one process group costs
nothing. ``WorkerPool.run(fn, *args)`` runs ``fn(rank, world_size, *args)`` on
every rank and returns the per-rank results. A body that raises fails the
test with every rank's traceback; a body that hangs (or kills its worker)
fails after ``timeout`` seconds, and the pool is restarted for the next test.

Ranks get different ``PYTHONHASHSEED``s, so a set's iteration order can
never silently agree across ranks.
"""

from __future__ import annotations

import importlib
import os
import queue
import socket
import time
import traceback
from typing import Any, Callable

import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _worker(rank: int, world_size: int, port: int, tasks: Any, results: Any, backend: str) -> None:
    import warnings

    import torch
    import torch.distributed as dist

    warnings.simplefilter("ignore")  # torch's own warnings are not under test here
    torch.set_num_threads(1)
    if "nccl" in backend:
        torch.cuda.set_device(rank % torch.cuda.device_count())
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    while True:
        task = tasks.get()
        if task is None:
            break
        module, name, args = task
        try:
            fn = getattr(importlib.import_module(module), name)
            results.put((rank, "ok", fn(rank, world_size, *args)))
        except BaseException:  # report everything, keep serving
            results.put((rank, "error", traceback.format_exc()))
    dist.destroy_process_group()


class WorkerPool:
    def __init__(self, world_size: int, backend: str = "gloo") -> None:
        self.world_size = world_size
        self.backend = backend
        self.procs: list[Any] = []
        self._start()

    def _start(self) -> None:
        ctx = mp.get_context("spawn")
        port = _free_port()
        self.tasks = [ctx.Queue() for _ in range(self.world_size)]
        self.results = ctx.Queue()
        saved = os.environ.get("PYTHONHASHSEED")
        try:
            for rank in range(self.world_size):
                os.environ["PYTHONHASHSEED"] = str(rank + 1)
                proc = ctx.Process(
                    target=_worker,
                    args=(rank, self.world_size, port, self.tasks[rank], self.results, self.backend),
                    daemon=True,
                )
                proc.start()
                self.procs.append(proc)
        finally:
            if saved is None:
                os.environ.pop("PYTHONHASHSEED", None)
            else:
                os.environ["PYTHONHASHSEED"] = saved

    def restart(self) -> None:
        for proc in self.procs:
            proc.kill()
            proc.join(5)
        self.procs = []
        self._start()

    def run(self, fn: Callable[..., Any], *args: Any, timeout: float = 120.0) -> list[Any]:
        """Run ``fn(rank, world_size, *args)`` on every rank; return results by rank."""
        for q in self.tasks:
            q.put((fn.__module__, fn.__qualname__, args))
        out: dict[int, Any] = {}
        errors: dict[int, str] = {}
        deadline = time.monotonic() + timeout
        while len(out) + len(errors) < self.world_size:
            left = deadline - time.monotonic()
            dead = [p for p in self.procs if not p.is_alive()]
            if left <= 0 or dead:
                self.restart()
                why = (
                    f"a worker died (exit code {dead[0].exitcode})"
                    if dead
                    else "the other ranks did not finish after one failed" if errors else f"timed out after {timeout:.0f}s"
                )
                raise AssertionError(
                    f"{fn.__qualname__}: {why}; ranks that answered: {sorted(out)}; "
                    f"errors: {errors}. The pool was restarted."
                )
            try:
                rank, status, value = self.results.get(timeout=min(left, 1.0))
            except queue.Empty:
                continue
            (out if status == "ok" else errors)[rank] = value
            if status != "ok":
                deadline = min(deadline, time.monotonic() + 10.0)  # the others may be stuck
        if errors:
            if len(errors) < self.world_size:
                self.restart()  # the other ranks may be stuck in a collective: start clean
            detail = "\n".join(f"--- rank {r} ---\n{tb}" for r, tb in sorted(errors.items()))
            raise AssertionError(f"{fn.__qualname__} failed on rank(s) {sorted(errors)}:\n{detail}")
        return [out[r] for r in range(self.world_size)]

    def close(self) -> None:
        for q in self.tasks:
            q.put(None)
        for proc in self.procs:
            proc.join(10)
            if proc.is_alive():
                proc.kill()
