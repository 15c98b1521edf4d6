"""Stop a sharded training run, resume it at another world size, get the same losses.

A small transformer trains with FSDP2 (``fully_shard`` on every block and on
the root) in CPU processes that talk over gloo, in three jobs:

1. uninterrupted: ``--steps`` steps at world size 2 (``--world-size``), recording each loss;
2. interrupted:   the same run checkpoints model, AdamW optimizer, LR scheduler
                  and step every ``--checkpoint-every`` steps and stops after
                  ``--resume-at``, with ``sdtree.get_state_dict`` +
                  ``dcp.async_save`` through an ``sdtree.Stager`` (a CPU mirror
                  the save reads while training goes on); each checkpoint is
                  also saved with a plain ``dcp.save``, to compare how long
                  each blocks training;
3. resumed:       a new job at ``--resume-world-size`` processes (1 by default)
                  loads that checkpoint with ``dcp.load`` + ``sdtree.set_state_dict``
                  and trains on to the last step.

Every world size trains on the same global batch at every step (each rank
takes its slice; loss and gradients are means over ranks), so the resumed run's
losses equal the uninterrupted run's up to float summation order. The script
prints both, step by step, how long each checkpoint blocked training, and
exits 0 when the losses match, 1 when they do not.

    python examples/train_resume.py                        # starts its own processes
    torchrun --nproc-per-node 2 examples/train_resume.py   # jobs 1 and 2 run in torchrun's

The parts to copy into a trainer are "Checkpointing" (save and load) and
"Training"; "Launching" and "Report" only stage the demo.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import shutil
import socket
import sys
import tempfile
import time
from pathlib import Path
from concurrent.futures import Future
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.nn.functional as F
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.optim.lr_scheduler import LambdaLR

import sdtree

# Model and data sizes: small enough for a laptop's two cores, big enough to be a real transformer.
VOCAB, SEQ, D_MODEL, HEADS, LAYERS = 256, 32, 64, 4, 3
GLOBAL_BATCH = 16  # rows per step, split over the ranks: divisible by 1, 2, 4, 8 and 16
LR, WARMUP = 1e-2, 4


@dataclasses.dataclass(frozen=True)
class Config:
    """What every rank of every job needs to know (picklable: spawned workers receive it pickled)."""

    steps: int
    resume_at: int
    checkpoint: str  # a directory: DCP writes one file per rank plus metadata
    seed: int = 0
    checkpoint_every: int = 5  # the interrupted job checkpoints after every this many steps, and at resume_at


@dataclasses.dataclass(frozen=True)
class Blocked:
    """How long one checkpoint blocked training (the slowest rank's), in seconds."""

    step: int  # checkpoint after this many steps
    async_save: float  # dcp.async_save through sdtree.Stager (waiting for the previous save included)
    save: float  # dcp.save of the same state


# ---------------------------------------------------------------------------
# Data: batch k is a function of k only, so every world size and every
# restart sees the same batches, and the checkpoint needs no data-loader or RNG
# state (there is no dropout either).
# ---------------------------------------------------------------------------


def global_batch(step: int, seed: int) -> torch.Tensor:
    """Return the ``(GLOBAL_BATCH, SEQ + 1)`` tokens of step ``step``.

    Each row counts from a random start by a random stride in 1..4, modulo
    VOCAB: after two tokens the rest of the row is predictable, so the loss
    falls within a few dozen steps.
    """
    gen = torch.Generator().manual_seed(seed * 1_000_003 + step)
    start = torch.randint(0, VOCAB, (GLOBAL_BATCH, 1), generator=gen)
    stride = torch.randint(1, 5, (GLOBAL_BATCH, 1), generator=gen)
    return (start + stride * torch.arange(SEQ + 1)) % VOCAB


def local_batch(step: int, seed: int) -> torch.Tensor:
    """This rank's equal slice of the global batch."""
    return global_batch(step, seed).tensor_split(dist.get_world_size())[dist.get_rank()]


# ---------------------------------------------------------------------------
# Model: a pre-norm decoder-only transformer.
# ---------------------------------------------------------------------------


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(D_MODEL)
        self.qkv = nn.Linear(D_MODEL, 3 * D_MODEL)
        self.proj = nn.Linear(D_MODEL, D_MODEL)
        self.norm2 = nn.LayerNorm(D_MODEL)
        self.mlp = nn.Sequential(nn.Linear(D_MODEL, 4 * D_MODEL), nn.GELU(), nn.Linear(4 * D_MODEL, D_MODEL))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, t, 3, HEADS, D_MODEL // HEADS).permute(2, 0, 3, 1, 4)
        attn = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(attn.transpose(1, 2).reshape(b, t, D_MODEL))
        return x + self.mlp(self.norm2(x))


class Transformer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, D_MODEL)
        self.pos = nn.Embedding(SEQ, D_MODEL)
        self.blocks = nn.ModuleList(Block() for _ in range(LAYERS))
        self.norm = nn.LayerNorm(D_MODEL)
        self.head = nn.Linear(D_MODEL, VOCAB, bias=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens) + self.pos(torch.arange(tokens.shape[1]))
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))


# ---------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------


def lr_factor(step: int, total: int) -> float:
    """Linear warm-up over WARMUP steps, then cosine decay to 10% at ``total``."""
    if step < WARMUP:
        return (step + 1) / WARMUP
    progress = (step - WARMUP) / max(1, total - WARMUP)
    return 0.1 + 0.45 * (1 + math.cos(math.pi * min(1.0, progress)))


def build(cfg: Config) -> tuple[nn.Module, torch.optim.Optimizer, LambdaLR]:
    """Build the sharded model, its AdamW and its LR schedule, the same way in every job."""
    torch.manual_seed(cfg.seed)  # every rank builds the same full model, then keeps its shard
    model = Transformer()
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    for block in model.blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)  # the root: embeddings, final norm, head
    # The optimizer is built on the sharded parameters: each rank keeps AdamW state for its shards only.
    decay = [p for p in model.parameters() if p.ndim == 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    optim = torch.optim.AdamW(
        [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}], lr=LR, betas=(0.9, 0.95), weight_decay=0.1
    )
    scheduler = LambdaLR(optim, lambda step: lr_factor(step, cfg.steps))
    return model, optim, scheduler


def train(model: nn.Module, optim: torch.optim.Optimizer, scheduler: LambdaLR, steps: range, seed: int) -> list[float]:
    """Run ``steps``; return each step's loss, the mean over the whole global batch."""
    losses = []
    for step in steps:
        tokens = local_batch(step, seed)
        logits = model(tokens[:, :-1])
        loss = F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())
        loss.backward()  # FSDP2 reduce-scatters the gradients, averaged over the ranks
        optim.step()
        optim.zero_grad()
        scheduler.step()
        global_loss = loss.detach().clone()
        dist.all_reduce(global_loss)  # equal slices: the mean of the ranks' means is the global mean
        losses.append(global_loss.item() / dist.get_world_size())
    return losses


# ---------------------------------------------------------------------------
# Checkpointing: sdtree gives sharded (DTensor) state dicts; DCP writes each
# rank's shards, and on load reads whatever shards of the saved tensors the
# new world size needs. Call both on every rank.
# ---------------------------------------------------------------------------


def checkpoint_state(model: nn.Module, optim: torch.optim.Optimizer, scheduler: LambdaLR, step: int) -> dict:
    model_sd, optim_sd = sdtree.get_state_dict(model, optim)  # FQN-keyed; model and optimizer are not touched
    return {"model": model_sd, "optim": optim_sd, "scheduler": scheduler.state_dict(), "step": step}


class AsyncCheckpointer:
    """Checkpoints with ``dcp.async_save`` through an ``sdtree.Stager``: training
    waits only while the state is copied into the stager's CPU mirror; DCP
    writes the mirror in a background thread, over a process group of its own
    (its collectives run beside training's). Non-tensor entries (scheduler,
    step) are pickled into the same checkpoint."""

    def __init__(self) -> None:
        self.group = dist.new_group(backend="gloo")
        self.stager: Optional[sdtree.Stager] = None
        self.pending: Optional[Future] = None

    def save(self, path: str, state: dict) -> None:
        self.wait()  # the mirror is written again only once the previous save has read it
        if self.stager is None:
            self.stager = sdtree.Stager(state)  # once: the mirror is reused by every checkpoint
        self.pending = dcp.async_save(state, checkpoint_id=path, async_stager=self.stager, process_group=self.group)

    def wait(self) -> None:
        if self.pending is not None:
            self.pending.result()
            self.pending = None

    def close(self) -> None:
        self.wait()
        if self.stager is not None:
            self.stager.close()
        dist.destroy_process_group(self.group)


def save_checkpoint(path: str, model: nn.Module, optim: torch.optim.Optimizer, scheduler: LambdaLR, step: int) -> None:
    """The synchronous way, for comparison: training waits until the files are written."""
    dcp.save(checkpoint_state(model, optim, scheduler, step), checkpoint_id=path)


def load_checkpoint(path: str, model: nn.Module, optim: torch.optim.Optimizer, scheduler: LambdaLR) -> int:
    """Load a checkpoint saved at any world size; return the step to resume from.

    Build the scheduler before calling this: its constructor writes the learning
    rate into the optimizer's param groups, and the loaded optimizer state must
    be what writes it last.
    """
    # The current state dicts, sharded for this world size, are the templates DCP loads into.
    # The optimizer has no state yet; sdtree still reports its full layout (without stepping it).
    model_sd, optim_sd = sdtree.get_state_dict(model, optim)
    state = {"model": model_sd, "optim": optim_sd, "scheduler": scheduler.state_dict(), "step": 0}
    dcp.load(state, checkpoint_id=path)  # fills ``state`` in place, resharding from the saved world size
    sdtree.set_state_dict(model, optim, model_state_dict=state["model"], optim_state_dict=state["optim"])
    scheduler.load_state_dict(state["scheduler"])
    return int(state["step"])


# ---------------------------------------------------------------------------
# The three jobs. Each runs on every rank of its process group and returns the
# losses of the steps it ran (the same list on every rank).
# ---------------------------------------------------------------------------


def uninterrupted(cfg: Config) -> list[float]:
    model, optim, scheduler = build(cfg)
    return train(model, optim, scheduler, range(cfg.steps), cfg.seed)


def interrupted(cfg: Config) -> tuple[list[float], list[Blocked]]:
    model, optim, scheduler = build(cfg)
    checkpointer = AsyncCheckpointer()
    losses, blocked = [], []
    stops = sorted({*range(cfg.checkpoint_every, cfg.resume_at, cfg.checkpoint_every), cfg.resume_at})
    done = 0
    for stop in stops:
        losses += train(model, optim, scheduler, range(done, stop), cfg.seed)
        done = stop
        path = cfg.checkpoint if stop == cfg.resume_at else str(Path(cfg.checkpoint).with_name(f"step_{stop}"))
        sync_path = str(Path(cfg.checkpoint).with_name(f"sync_step_{stop}"))
        start = time.perf_counter()
        checkpointer.wait()  # the previous save must be done: training blocks here if it is not
        waited = time.perf_counter() - start
        start = time.perf_counter()
        save_checkpoint(sync_path, model, optim, scheduler, stop)  # the same state, saved the synchronous way
        sync = time.perf_counter() - start
        start = time.perf_counter()
        checkpointer.save(path, checkpoint_state(model, optim, scheduler, stop))
        seconds = torch.tensor([waited + time.perf_counter() - start, sync], dtype=torch.float64)
        dist.all_reduce(seconds, op=dist.ReduceOp.MAX)  # the slowest rank is what training waits for
        blocked.append(Blocked(stop, *seconds.tolist()))
        if dist.get_rank() == 0:
            shutil.rmtree(sync_path, ignore_errors=True)  # only measured
    checkpointer.close()  # the last save has landed before the job ends
    return losses, blocked  # ... and the job ends here, as if preempted


def resumed(cfg: Config) -> list[float]:
    model, optim, scheduler = build(cfg)  # a fresh init: everything it holds is overwritten by the load
    step = load_checkpoint(cfg.checkpoint, model, optim, scheduler)
    return train(model, optim, scheduler, range(step, cfg.steps), cfg.seed)


Job = Callable[[Config], Any]  # losses; the interrupted job also its checkpoints' Blocked


# ---------------------------------------------------------------------------
# Launching: each job gets its own processes, started the way torchrun starts
# them (torch.distributed's elastic launcher, torchrun's own engine), with the
# rendezvous on a free port of 127.0.0.1.
# ---------------------------------------------------------------------------


def _worker(job: Job, cfg: Config) -> Any:
    """Entry point of a launched process: the launcher has set RANK, WORLD_SIZE, MASTER_ADDR/PORT."""
    torch.set_num_threads(1)  # one process per core; more threads only add overhead at this size
    dist.init_process_group("gloo")
    try:
        return job(cfg)
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def launch(world_size: int, job: Job, cfg: Config) -> Any:
    """Run ``job`` in ``world_size`` new processes, as ``torchrun --nproc-per-node`` would; return rank 0's result."""
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    # Forked workers inherit this process's imports and start in a fraction of a second
    # (spawned ones import torch again: seconds each). Fork is safe while this process has
    # only imported modules; once it has run collectives (rank 0 under torchrun), or off
    # Linux, spawn.
    fork_is_safe = sys.platform == "linux" and not dist.is_initialized()
    if fork_is_safe:
        import torch._dynamo  # noqa: F401  fully_shard imports it on first use (a second or more): once, here
    config = LaunchConfig(
        min_nodes=1,
        max_nodes=1,
        nproc_per_node=world_size,
        rdzv_backend="c10d",
        rdzv_endpoint=f"127.0.0.1:{_free_port()}",
        run_id=f"train_resume_{job.__name__}",
        max_restarts=0,
        monitor_interval=0.1,
        start_method="fork" if fork_is_safe else "spawn",
    )
    return elastic_launch(config, _worker)(job, cfg)[0]


def run_job(world_size: int, job: Job, cfg: Config) -> tuple[Any, float]:
    """Run ``job`` at ``world_size``; return its result and wall time (process start included).

    Under torchrun, a job at torchrun's world size runs in torchrun's processes;
    one at another world size is launched by rank 0 while the other ranks wait.
    """
    start = time.perf_counter()
    if not dist.is_initialized():
        losses = launch(world_size, job, cfg)
    elif world_size == dist.get_world_size():
        losses = job(cfg)
    else:
        losses = launch(world_size, job, cfg) if dist.get_rank() == 0 else []
        dist.barrier()
    return losses, time.perf_counter() - start


# ---------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------

# The losses are float32 numbers between about 1 and 6, where one ulp is 1.2e-7 to 4.8e-7.
# At another world size only the summation order changes (matmuls over a different batch
# slice, the gradient mean over a different number of ranks), and AdamW carries those
# last-bit differences forward. Measured: at most 9.5e-7 (2 ulps), resuming at world
# size 1, 2 or 4 after 5 to 20 steps and running up to 70 more. 1e-5 leaves a 10x margin
# and is still 1000x below the effect of a broken resume: not loading the scheduler, or
# the AdamW moments, moves the loss by more than 1e-2 within two steps.
TOLERANCE = 1e-5


@dataclasses.dataclass
class Results:
    cfg: Config
    world_size: int
    resume_world_size: int
    full: list[float]  # uninterrupted run, every step
    split: list[float]  # interrupted run's steps, then the resumed run's
    seconds: dict[str, float]
    blocked: list[Blocked] = dataclasses.field(default_factory=list)  # the interrupted run's checkpoints

    def diffs(self) -> list[float]:
        return [abs(a - b) for a, b in zip(self.full, self.split)]

    def matches(self) -> bool:
        return len(self.full) == len(self.split) == self.cfg.steps and max(self.diffs()) <= TOLERANCE


def _checkpoint_size(path: str) -> tuple[int, int]:
    files = [f for f in Path(path).iterdir() if f.is_file()]
    return sum(f.stat().st_size for f in files), len(files)


def print_table(res: Results) -> None:
    k = res.cfg.resume_at
    print(f"{'step':>4}  {'uninterrupted':>13}  {'stopped+resumed':>15}  {'|diff|':>8}")
    for step, (a, b, d) in enumerate(zip(res.full, res.split, res.diffs())):
        if step == k:
            print(f"  -- checkpoint after step {k - 1}; resumed at world size {res.resume_world_size} --")
        print(f"{step:>4}  {a:>13.6f}  {b:>15.6f}  {d:>8.1e}")


def print_summary(res: Results, plot: Optional[Path]) -> None:
    size, n_files = _checkpoint_size(res.cfg.checkpoint)
    print(f"checkpoint: {res.cfg.checkpoint} ({size / 2**20:.2f} MiB, {n_files} files; model, AdamW, scheduler, step)")
    seconds = res.seconds
    print(
        f"time: uninterrupted {seconds['uninterrupted']:.1f} s (world size {res.world_size}), "
        f"interrupted {seconds['interrupted']:.1f} s (world size {res.world_size}), "
        f"resumed {seconds['resumed']:.1f} s (world size {res.resume_world_size}); wall clock per job"
    )
    if plot is not None:
        print(f"plot: {plot}")
    for b in res.blocked:
        print(
            f"checkpoint after {b.step} steps: training blocked {b.async_save * 1e3:.1f} ms by dcp.async_save "
            f"through sdtree.Stager, {b.save * 1e3:.1f} ms by dcp.save"
        )
    diffs, k = res.diffs(), res.cfg.resume_at
    print(f"before the checkpoint (same world size): max |diff| {max(diffs[:k]):.1e}; after: {max(diffs[k:]):.1e}")


def verdict(res: Results) -> str:
    """One line: ``match: ...`` or ``MISMATCH: ...``."""
    if len(res.split) != res.cfg.steps:
        return f"MISMATCH: the stopped and resumed runs ran {len(res.split)} of {res.cfg.steps} steps"
    worst = max(res.diffs())
    if res.matches():
        return (
            f"match: the run resumed at world size {res.resume_world_size} has the uninterrupted run's losses "
            f"at all {res.cfg.steps} steps (max |diff| {worst:.1e} <= {TOLERANCE:.0e})"
        )
    first = next(step for step, d in enumerate(res.diffs()) if d > TOLERANCE)
    return f"MISMATCH: losses differ by up to {worst:.1e} > {TOLERANCE:.0e}, first at step {first}"


def plot_losses(res: Results, out: Path) -> Optional[Path]:
    """Write ``losses.png`` if matplotlib is installed; return its path, or None."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(res.full, label=f"uninterrupted (world size {res.world_size})", linewidth=3, alpha=0.5)
    ax.plot(res.split, "--", label=f"stopped at {res.cfg.resume_at}, resumed at world size {res.resume_world_size}")
    ax.axvline(res.cfg.resume_at - 0.5, color="gray", linewidth=0.8)
    ax.set(xlabel="step", ylabel="loss", title="FSDP2 training, checkpointed with sdtree + DCP")
    ax.legend()
    fig.tight_layout()
    path = out / "losses.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# ---------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    # `sdtree demo` runs this script and names the command in SDTREE_DEMO_PROG, for the usage line.
    parser = argparse.ArgumentParser(prog=os.environ.get("SDTREE_DEMO_PROG"), description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=30, help="steps of the whole run (default 30)")
    parser.add_argument("--resume-at", type=int, default=None, help="checkpoint after this many steps (default half)")
    parser.add_argument("--checkpoint-every", type=int, default=5, help="steps between checkpoints (default 5)")
    parser.add_argument("--world-size", type=int, default=2, help="of jobs 1 and 2 (default 2; under torchrun, its)")
    parser.add_argument("--resume-world-size", type=int, default=1, help="of the resumed job (default 1)")
    parser.add_argument("--out", type=Path, default=None, help="for checkpoint and plot (default: a new temp dir)")
    parser.add_argument("--no-plot", action="store_true", help="do not write losses.png")
    parser.add_argument("--quiet", action="store_true", help="print only the verdict")
    args = parser.parse_args(argv)
    if args.resume_at is None:
        args.resume_at = args.steps // 2
    if args.checkpoint_every < 1:
        parser.error(f"--checkpoint-every must be at least 1, got {args.checkpoint_every}")
    if not 0 < args.resume_at < args.steps:
        parser.error(f"--resume-at must be between 1 and --steps - 1 = {args.steps - 1}, got {args.resume_at}")
    if dist.is_torchelastic_launched():
        args.world_size = int(os.environ["WORLD_SIZE"])
    for name in ("world_size", "resume_world_size"):
        size = getattr(args, name)
        if size < 1 or GLOBAL_BATCH % size:
            parser.error(f"--{name.replace('_', '-')} must divide the global batch of {GLOBAL_BATCH}, got {size}")
    return args


def _out_dir(args: argparse.Namespace) -> Path:
    """The output directory, the same on every rank under torchrun."""
    out = [None]
    if not dist.is_initialized() or dist.get_rank() == 0:
        out[0] = args.out or Path(tempfile.mkdtemp(prefix="sdtree-train-resume-"))
        out[0].mkdir(parents=True, exist_ok=True)
        shutil.rmtree(out[0] / f"step_{args.resume_at}", ignore_errors=True)  # never resume from an older run's files
    if dist.is_initialized():
        dist.broadcast_object_list(out, src=0)
    return out[0].resolve()


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    if dist.is_torchelastic_launched():  # torchrun: jobs 1 and 2 run in these processes
        torch.set_num_threads(1)
        dist.init_process_group("gloo")
    out = _out_dir(args)
    cfg = Config(
        steps=args.steps,
        resume_at=args.resume_at,
        checkpoint=str(out / f"step_{args.resume_at}"),
        checkpoint_every=args.checkpoint_every,
    )
    leader = not dist.is_initialized() or dist.get_rank() == 0
    say = print if leader and not args.quiet else (lambda *a, **k: None)

    say(f"1/3 uninterrupted: {cfg.steps} steps at world size {args.world_size}", flush=True)
    full, t_full = run_job(args.world_size, uninterrupted, cfg)
    say(
        f"2/3 interrupted: checkpoints every {cfg.checkpoint_every} steps (dcp.async_save through sdtree.Stager), "
        f"stops after {cfg.resume_at} steps, last checkpoint in {cfg.checkpoint}",
        flush=True,
    )
    (first, blocked), t_first = run_job(args.world_size, interrupted, cfg)
    say(f"3/3 resumed: world size {args.resume_world_size}, steps {cfg.resume_at}..{cfg.steps - 1}", flush=True)
    rest, t_rest = run_job(args.resume_world_size, resumed, cfg)

    seconds = {"uninterrupted": t_full, "interrupted": t_first, "resumed": t_rest}
    res = Results(cfg, args.world_size, args.resume_world_size, full, first + rest, seconds, blocked)
    ok = [res.matches()]
    if dist.is_initialized():  # every torchrun rank exits with rank 0's verdict
        dist.broadcast_object_list(ok, src=0)
        dist.destroy_process_group()
    if leader:
        if not args.quiet:
            print_table(res)
            print_summary(res, None if args.no_plot else plot_losses(res, out))
        print(verdict(res))
    return 0 if ok[0] else 1


if __name__ == "__main__":
    sys.exit(main())
