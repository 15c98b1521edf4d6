"""Train a Llama in Hugging Face's layout, convert model + AdamW to torchtitan's, resume there: same losses.

A tiny ``LlamaForCausalLM`` (transformers) trains with AdamW; after
``--resume-at`` steps its model and optimizer are checkpointed with
``sdtree.get_state_dict`` + ``torch.distributed.checkpoint.save`` and it trains
on, uninterrupted, to ``--steps``. Then:

1. ``sdtree.checkpoint.convert`` streams that DCP checkpoint through the recipe
   ``llama.hf_to_torchtitan(..., fuse_qkv=True)`` into a torchtitan-layout DCP
   checkpoint: keys renamed, q and k rows moved from Hugging Face's half-split
   rotary layout to the interleaved one, q/k/v fused into ``wqkv``, and the
   AdamW moments (``exp_avg``, ``exp_avg_sq``) permuted and fused with their
   parameters, ``step`` carried;
2. a torchtitan-style model written below (``Transformer``: fused ``wqkv``,
   interleaved rotary embeddings on complex pairs, grouped-query attention,
   SwiGLU ``w2(silu(w1 x) * w3 x)``, RMSNorm), built from another seed with an
   AdamW of the same hyper-parameters, loads the converted checkpoint with
   ``dcp.load`` + ``sdtree.set_state_dict`` (strict: every key must fit) and
   trains the remaining steps on the same batches.

The two models compute the same function in a different summation order, so
the resumed run's losses equal the uninterrupted run's up to float noise. The
script prints both, step by step, and exits 0 when they match, 1 when they do
not; ``--break-optimizer`` resumes from a deliberately wrong conversion to show
what the check catches.

    python examples/hf_to_torchtitan_resume.py
    python examples/hf_to_torchtitan_resume.py --break-optimizer unpermuted   # exits 1

The same conversion from the shell:

    sdtree convert hf_step_6 torchtitan_step_6 --recipe llama-hf-to-torchtitan \\
        --n-heads 4 --n-kv-heads 2 --dim 64 --fuse-qkv
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Iterator, Optional

import torch
import torch.distributed.checkpoint as dcp
import torch.nn.functional as F
from torch import nn

try:
    from transformers import LlamaConfig, LlamaForCausalLM
except ImportError:  # sdtree does not need it; this example trains transformers' Llama
    sys.exit("hf_to_torchtitan_resume.py needs transformers: pip install 'transformers>=5'")

import sdtree
from sdtree import checkpoint
from sdtree.recipes import llama
from sdtree.transforms import at, each, permute_for_rope

# The model: tiny, but every part a real Llama has (GQA: 2 query heads share each k/v head).
VOCAB, SEQ, DIM, LAYERS, N_HEADS, N_KV_HEADS, HIDDEN = 128, 32, 64, 2, 4, 2, 96
HEAD_DIM = DIM // N_HEADS
NORM_EPS, ROPE_THETA = 1e-6, 10000.0  # LlamaConfig's defaults
BATCH = 16
# AdamW: two param groups (no weight decay on the norms), non-default betas.
LR, BETAS, WEIGHT_DECAY = 3e-3, (0.9, 0.95), 0.1


# ---------------------------------------------------------------------------
# Data: batch k is a function of k only, so the resumed run sees the batches
# the uninterrupted one saw, and the checkpoint needs no data-loader state.
# ---------------------------------------------------------------------------


def batch(step: int, seed: int) -> torch.Tensor:
    """The ``(BATCH, SEQ + 1)`` tokens of step ``step``: rows that count from a
    random start by a random stride in 1..4, modulo VOCAB (learnable fast)."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + step)
    start = torch.randint(0, VOCAB, (BATCH, 1), generator=gen)
    stride = torch.randint(1, 5, (BATCH, 1), generator=gen)
    return (start + stride * torch.arange(SEQ + 1)) % VOCAB


# ---------------------------------------------------------------------------
# The Hugging Face model
# ---------------------------------------------------------------------------


def hf_model(seed: int) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=DIM,
        intermediate_size=HIDDEN,
        num_hidden_layers=LAYERS,
        num_attention_heads=N_HEADS,
        num_key_value_heads=N_KV_HEADS,
        max_position_embeddings=SEQ,
        rms_norm_eps=NORM_EPS,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


# ---------------------------------------------------------------------------
# A torchtitan-style Llama, written from torchtitan's model code
# (torchtitan/models/llama3/model), with q/k/v fused into one projection.
# Its parameter names are the recipe's output keys.
# ---------------------------------------------------------------------------


def precompute_freqs_cis(head_dim: int, seqlen: int, theta: float) -> torch.Tensor:
    freqs = 1.0 / (theta ** (torch.arange(0, head_dim, 2)[: head_dim // 2].float() / head_dim))
    freqs = torch.outer(torch.arange(seqlen, dtype=torch.float32), freqs)
    return torch.polar(torch.ones_like(freqs), freqs)  # (seqlen, head_dim // 2), complex64


def apply_rotary_emb(x: torch.Tensor, freqs_cis: torch.Tensor) -> torch.Tensor:
    """Rotate the pairs (0, 1), (2, 3), ... of each head (the interleaved layout); x: (bs, seq, heads, head_dim)."""
    pairs = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
    return torch.view_as_real(pairs * freqs_cis[None, :, None, :]).flatten(3).type_as(x)


class Attention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.sizes = [N_HEADS * HEAD_DIM, N_KV_HEADS * HEAD_DIM, N_KV_HEADS * HEAD_DIM]
        self.wqkv = nn.Linear(DIM, sum(self.sizes), bias=False)
        self.wo = nn.Linear(N_HEADS * HEAD_DIM, DIM, bias=False)

    def forward(self, x: torch.Tensor, freqs_cis: torch.Tensor) -> torch.Tensor:
        bs, seqlen, _ = x.shape
        xq, xk, xv = self.wqkv(x).split(self.sizes, dim=-1)
        xq = apply_rotary_emb(xq.view(bs, seqlen, N_HEADS, HEAD_DIM), freqs_cis)
        xk = apply_rotary_emb(xk.view(bs, seqlen, N_KV_HEADS, HEAD_DIM), freqs_cis)
        xv = xv.view(bs, seqlen, N_KV_HEADS, HEAD_DIM)
        repeat = N_HEADS // N_KV_HEADS  # torchtitan's repeat_kv: each k/v head serves `repeat` query heads
        xk, xv = xk.repeat_interleave(repeat, dim=2), xv.repeat_interleave(repeat, dim=2)
        out = F.scaled_dot_product_attention(xq.transpose(1, 2), xk.transpose(1, 2), xv.transpose(1, 2), is_causal=True)
        return self.wo(out.transpose(1, 2).reshape(bs, seqlen, -1))


class FeedForward(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w1 = nn.Linear(DIM, HIDDEN, bias=False)
        self.w2 = nn.Linear(HIDDEN, DIM, bias=False)
        self.w3 = nn.Linear(DIM, HIDDEN, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TransformerBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attention = Attention()
        self.feed_forward = FeedForward()
        self.attention_norm = nn.RMSNorm(DIM, eps=NORM_EPS)
        self.ffn_norm = nn.RMSNorm(DIM, eps=NORM_EPS)

    def forward(self, x: torch.Tensor, freqs_cis: torch.Tensor) -> torch.Tensor:
        h = x + self.attention(self.attention_norm(x), freqs_cis)
        return h + self.feed_forward(self.ffn_norm(h))


class Transformer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.tok_embeddings = nn.Embedding(VOCAB, DIM)
        self.layers = nn.ModuleList(TransformerBlock() for _ in range(LAYERS))
        self.norm = nn.RMSNorm(DIM, eps=NORM_EPS)
        self.output = nn.Linear(DIM, VOCAB, bias=False)
        # Not persistent, as in torchtitan: computed, never in a state dict.
        self.register_buffer("freqs_cis", precompute_freqs_cis(HEAD_DIM, SEQ, ROPE_THETA), persistent=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.tok_embeddings(tokens)
        freqs_cis = self.freqs_cis[: tokens.shape[1]]
        for layer in self.layers:
            h = layer(h, freqs_cis)
        return self.output(self.norm(h))


# ---------------------------------------------------------------------------
# Training: the same loop, loss and optimizer for both layouts.
# ---------------------------------------------------------------------------


def adamw(model: nn.Module) -> torch.optim.AdamW:
    """AdamW with weight decay on the matrices only. In the other layout the
    groups hold other parameters (wqkv for q_proj, k_proj, v_proj), and
    ``set_state_dict`` matches them by FQN."""
    decay = [p for p in model.parameters() if p.ndim == 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    groups = [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=LR, betas=BETAS, weight_decay=WEIGHT_DECAY)


def logits_of(model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    if isinstance(model, LlamaForCausalLM):
        return model(input_ids=tokens).logits
    return model(tokens)


def train(model: nn.Module, optim: torch.optim.Optimizer, steps: range, seed: int) -> list[float]:
    losses = []
    for step in steps:
        tokens = batch(step, seed)
        logits = logits_of(model, tokens[:, :-1])
        loss = F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())
        loss.backward()
        optim.step()
        optim.zero_grad()
        losses.append(loss.item())
    return losses


# ---------------------------------------------------------------------------
# Checkpointing and conversion
# ---------------------------------------------------------------------------


@contextlib.contextmanager
def single_process() -> Iterator[None]:
    """For DCP calls with ``no_dist=True`` (one process, no process group),
    which warn that they are in that mode even when asked for it."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled", category=UserWarning)
        yield


def save_checkpoint(path: Path, model: nn.Module, optim: torch.optim.Optimizer, step: int) -> None:
    model_sd, optim_sd = sdtree.get_state_dict(model, optim)  # FQN-keyed: what a recipe can rename
    with single_process():
        dcp.save({"model": model_sd, "optim": optim_sd, "step": step}, checkpoint_id=path, no_dist=True)


def recipe() -> sdtree.Transform:
    return llama.hf_to_torchtitan(n_heads=N_HEADS, n_kv_heads=N_KV_HEADS, dim=DIM, fuse_qkv=True)


def convert(src: Path, dst: Path) -> checkpoint.Conversion:
    """The conversion: ``each`` applies the recipe to the model and, as a
    ``(model, optim)`` pair, to the optimizer, so the moments follow their
    parameters; ``step`` is kept. It streams: one fused group in memory at a time."""
    return checkpoint.convert(src, dst, transform=each(recipe()))


BROKEN = {
    "fresh": "the weights converted, the optimizer left behind: a fresh AdamW",
    "unpermuted": "the moments renamed and fused, but their q/k rows left in Hugging Face's order",
}


def convert_broken(src: Path, dst: Path, how: str) -> None:
    """A deliberately wrong conversion, for ``--break-optimizer``: one of ``BROKEN``.

    ``fresh`` is what a weights-only converter leaves you with. ``unpermuted``
    puts the moments out of step with their parameters: q and k rows move to
    the interleaved rotary layout, their moments do not (the recipe's rotary
    steps are cancelled on the optimizer).
    """
    if how == "fresh":
        checkpoint.convert(src, dst, transform=at("model", recipe()))
        return
    hf = checkpoint.load(src)
    q, k = "model.layers.{i}.self_attn.q_proj.weight", "model.layers.{i}.self_attn.k_proj.weight"
    undo_rotary = permute_for_rope(q, n_heads=N_HEADS) >> permute_for_rope(k, n_heads=N_KV_HEADS)
    optim = (undo_rotary >> recipe())(hf["optim"])  # the recipe's unpermute_for_rope now restores HF's rows
    with single_process():
        dcp.save({"model": recipe()(hf["model"]), "optim": optim, "step": hf["step"]}, checkpoint_id=dst, no_dist=True)


def resume(path: Path, seed: int, *, with_optimizer: bool = True) -> tuple[Transformer, torch.optim.AdamW, int]:
    """Build the torchtitan-style model and its AdamW; load the checkpoint at ``path`` into both
    (into the model only, without ``with_optimizer``)."""
    torch.manual_seed(seed + 1)  # another init: everything it holds must come from the checkpoint
    model = Transformer()
    optim = adamw(model)
    # Templates for DCP: the optimizer has no state yet, sdtree still reports its full layout.
    model_sd, optim_sd = sdtree.get_state_dict(model, optim)
    state = {"model": model_sd, "optim": optim_sd, "step": 0} if with_optimizer else {"model": model_sd, "step": 0}
    with single_process():
        dcp.load(state, checkpoint_id=path, no_dist=True)
    if with_optimizer:
        sdtree.set_state_dict(model, optim, model_state_dict=state["model"], optim_state_dict=state["optim"])
    else:
        sdtree.set_model_state_dict(model, state["model"])
    return model, optim, int(state["step"])


# ---------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------

# The losses are float32 numbers from 4.9 (about ln 128) down to 3, where one ulp is 2.4e-7 to
# 4.8e-7. The two models compute the same function in different orders: q/k/v in one matmul,
# rotary embeddings as complex products instead of rotate_half, nn.RMSNorm for LlamaRMSNorm,
# k/v heads repeated instead of SDPA's grouped-query path. On the weights of the checkpoint
# their logits differ by up to 1.2e-6 (printed on every run), and AdamW carries the gradients'
# last-bit differences forward. Measured, seeds 0-4, resuming after 2 to 20 steps and running
# up to 30 more: the losses differ by at most 4.8e-7 (one or two ulps), and the difference
# does not grow with the steps. 5e-6 leaves a 10x margin, and it is 40x below the
# subtlest broken conversion tried (--break-optimizer, seeds 0-2): moments fused but left in
# Hugging Face's q/k row order move the loss by 2e-4 to 5e-4 on the second resumed step and
# by 1e-3 after ten; resuming with a fresh AdamW, by 2e-3 to 5e-2 on the second step.
TOLERANCE = 5e-6


def print_table(full: list[float], resumed: list[float], resume_at: int) -> None:
    print(f"{'step':>4}  {'uninterrupted':>13}  {'resumed':>9}  {'|diff|':>8}")
    for step, loss in enumerate(full):
        if step < resume_at:
            print(f"{step:>4}  {loss:>13.6f}")
            continue
        if step == resume_at:
            print(f"  -- checkpoint after step {resume_at - 1}; converted; resumed in torchtitan's layout --")
        other = resumed[step - resume_at]
        print(f"{step:>4}  {loss:>13.6f}  {other:>9.6f}  {abs(loss - other):>8.1e}")


def verdict(full: list[float], resumed: list[float], resume_at: int) -> tuple[bool, str]:
    """``(ok, line)``: the line is ``match: ...`` or ``MISMATCH: ...``."""
    expected = full[resume_at:]
    if len(resumed) != len(expected):
        return False, f"MISMATCH: the resumed run ran {len(resumed)} of {len(expected)} steps"
    diffs = [abs(a - b) for a, b in zip(expected, resumed)]
    worst = max(diffs)
    if worst <= TOLERANCE:
        return True, (
            f"match: the run resumed in torchtitan's layout has the uninterrupted run's losses at all "
            f"{len(diffs)} steps after the conversion (max |diff| {worst:.1e} <= {TOLERANCE:.0e})"
        )
    first = resume_at + next(i for i, d in enumerate(diffs) if d > TOLERANCE)
    return False, f"MISMATCH: losses differ by up to {worst:.1e} > {TOLERANCE:.0e}, first at step {first}"


def describe(conversion: checkpoint.Conversion) -> list[str]:
    """What the conversion did to layer 0's fused attention projection, parameter and moments alike."""
    lines = [f"  {conversion.tensors} tensors written ({conversion.nbytes / 2**20:.2f} MiB), one fused group at a time; e.g."]
    for planned in conversion.plan:
        if ".layers.0.attention.wqkv.weight" in planned.key and planned.rules:  # not the step count, copied
            parts = ", ".join(source.split(".self_attn.")[1].split(".")[0] for source in planned.sources)
            lines.append(f"  {planned.key} {tuple(planned.shape)} <- {parts} by {' >> '.join(planned.rules)}")
    return lines


# ---------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=os.environ.get("SDTREE_DEMO_PROG"), description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=12, help="steps of the whole run (default 12)")
    parser.add_argument("--resume-at", type=int, default=None, help="checkpoint after this many steps (default half)")
    parser.add_argument("--seed", type=int, default=0, help="of the initial weights and the data (default 0)")
    parser.add_argument("--out", type=Path, default=None, help="for the checkpoints (default: a new temp dir)")
    parser.add_argument(
        "--break-optimizer",
        choices=sorted(BROKEN),
        default=None,
        help="resume from a wrong conversion, to see the check fail: " + "; ".join(f"{k}: {v}" for k, v in BROKEN.items()),
    )
    parser.add_argument("--quiet", action="store_true", help="print only the verdict")
    args = parser.parse_args(argv)
    if args.resume_at is None:
        args.resume_at = args.steps // 2
    if not 0 < args.resume_at < args.steps:
        parser.error(f"--resume-at must be between 1 and --steps - 1 = {args.steps - 1}, got {args.resume_at}")
    return args


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    say = (lambda *a, **k: None) if args.quiet else print
    out = (args.out or Path(tempfile.mkdtemp(prefix="sdtree-hf-to-torchtitan-"))).resolve()
    out.mkdir(parents=True, exist_ok=True)
    hf_ckpt, tt_ckpt = out / f"hf_step_{args.resume_at}", out / f"torchtitan_step_{args.resume_at}"
    for path in (hf_ckpt, tt_ckpt):  # never resume from an older run's files
        shutil.rmtree(path, ignore_errors=True)
    probe = batch(args.resume_at, args.seed)[:, :-1]  # both models' logits on the checkpoint's weights

    say(f"1/3 Hugging Face layout: {args.steps} steps of LlamaForCausalLM; after {args.resume_at}, checkpoint -> {hf_ckpt}")
    hf = hf_model(args.seed)
    hf_optim = adamw(hf)
    full = train(hf, hf_optim, range(args.resume_at), args.seed)
    save_checkpoint(hf_ckpt, hf, hf_optim, step=args.resume_at)
    with torch.no_grad():
        hf_logits = logits_of(hf, probe)
    full += train(hf, hf_optim, range(args.resume_at, args.steps), args.seed)  # and on, uninterrupted

    say(f"2/3 convert model + AdamW to torchtitan's layout, q/k/v fused -> {tt_ckpt}")
    if args.break_optimizer:
        say(f"  deliberately wrong (--break-optimizer {args.break_optimizer}): {BROKEN[args.break_optimizer]}")
        convert_broken(hf_ckpt, tt_ckpt, args.break_optimizer)
    else:
        for line in describe(convert(hf_ckpt, tt_ckpt)):
            say(line)

    say(f"3/3 torchtitan layout: a torchtitan-style Transformer loads it and trains steps {args.resume_at}..{args.steps - 1}")
    tt, tt_optim, step = resume(tt_ckpt, args.seed, with_optimizer=args.break_optimizer != "fresh")
    with torch.no_grad():
        noise = (logits_of(tt, probe) - hf_logits).abs().max().item()
    resumed = train(tt, tt_optim, range(step, args.steps), args.seed)

    ok, line = verdict(full, resumed, args.resume_at)
    if not args.quiet:
        print_table(full, resumed, args.resume_at)
        print(f"same weights, same batch: the two models' logits differ by up to {noise:.1e} (summation order)")
    print(line)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
