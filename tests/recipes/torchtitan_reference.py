"""A torchtitan-style Llama / Mixtral forward pass on a torchtitan-layout
state dict, written from torchtitan's model code: interleaved rotary
embeddings on complex pairs (``precompute_freqs_cis`` / ``apply_rotary_emb``),
``wq``/``wk``/``wv``/``wo``, ``w2(silu(w1 x) * w3 x)``, grouped experts
``(num_experts, out, in)`` used as ``x @ w[e].T``, a softmax top-k router
whose weights are renormalised (Mixtral's routing).

It reads the fused keys of sdtree's recipes too (``wqkv``, ``w13``), so a
converted state dict can be checked by the logits it computes: a wrong
rotary permutation, fusion order or expert order changes them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _rms_norm(x, weight, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def _freqs_cis(head_dim, seqlen, theta):
    freqs = 1.0 / (theta ** (torch.arange(0, head_dim, 2)[: head_dim // 2].float() / head_dim))
    freqs = torch.outer(torch.arange(seqlen, dtype=torch.float32), freqs)
    return torch.polar(torch.ones_like(freqs), freqs)


def _rotary(x, freqs_cis):
    # x: (batch, seq, heads, head_dim); pairs (0, 1), (2, 3), ... rotate together (interleaved)
    pairs = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
    return torch.view_as_real(pairs * freqs_cis[None, :, None, :]).flatten(3).type_as(x)


def _attention(sd, p, x, freqs_cis, n_heads, n_kv_heads, head_dim):
    bs, seqlen, _ = x.shape
    if f"{p}.attention.wqkv.weight" in sd:
        wq, wk, wv = sd[f"{p}.attention.wqkv.weight"].split([n_heads * head_dim, n_kv_heads * head_dim, n_kv_heads * head_dim])
    else:
        wq, wk, wv = (sd[f"{p}.attention.{w}.weight"] for w in ("wq", "wk", "wv"))
    q = (x @ wq.T).view(bs, seqlen, n_heads, head_dim)
    k = (x @ wk.T).view(bs, seqlen, n_kv_heads, head_dim)
    v = (x @ wv.T).view(bs, seqlen, n_kv_heads, head_dim)
    q, k = _rotary(q, freqs_cis), _rotary(k, freqs_cis)
    repeat = n_heads // n_kv_heads
    k, v = k.repeat_interleave(repeat, dim=2), v.repeat_interleave(repeat, dim=2)
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)
    return out.transpose(1, 2).reshape(bs, seqlen, -1) @ sd[f"{p}.attention.wo.weight"].T


def _feed_forward(sd, p, x):
    if f"{p}.feed_forward.w13.weight" in sd:
        w1, w3 = sd[f"{p}.feed_forward.w13.weight"].chunk(2)
    else:
        w1, w3 = sd[f"{p}.feed_forward.w1.weight"], sd[f"{p}.feed_forward.w3.weight"]
    return (F.silu(x @ w1.T) * (x @ w3.T)) @ sd[f"{p}.feed_forward.w2.weight"].T


def _moe(sd, p, x, top_k):
    w1, w2, w3 = (sd[f"{p}.moe.experts.{w}"] for w in ("w1", "w2", "w3"))
    tokens = x.reshape(-1, x.shape[-1])
    scores = F.softmax((tokens @ sd[f"{p}.moe.router.gate.weight"].T).float(), dim=1)
    top, chosen = scores.topk(top_k, dim=1)
    top = (top / top.sum(dim=1, keepdim=True)).type_as(x)
    out = torch.zeros_like(tokens)
    for t in range(tokens.shape[0]):
        for weight, e in zip(top[t], chosen[t].tolist()):
            h = F.silu(tokens[t] @ w1[e].T) * (tokens[t] @ w3[e].T)
            out[t] += weight * (h @ w2[e].T)
    return out.view_as(x)


def logits(sd, tokens, *, n_heads, n_kv_heads, head_dim, eps, theta=10000.0, top_k=None):
    """The logits of the torchtitan-layout state dict ``sd`` for ``tokens``
    (``top_k``: a Mixtral-style MoE model routing each token to ``top_k`` experts)."""
    n_layers = len({k.split(".")[1] for k in sd if k.startswith("layers.")})
    h = F.embedding(tokens, sd["tok_embeddings.weight"])
    freqs_cis = _freqs_cis(head_dim, tokens.shape[1], theta)
    for i in range(n_layers):
        p = f"layers.{i}"
        h = h + _attention(sd, p, _rms_norm(h, sd[f"{p}.attention_norm.weight"], eps), freqs_cis, n_heads, n_kv_heads, head_dim)
        normed = _rms_norm(h, sd[f"{p}.ffn_norm.weight"], eps)
        h = h + (_moe(sd, p, normed, top_k) if top_k else _feed_forward(sd, p, normed))
    return _rms_norm(h, sd["norm.weight"], eps) @ sd["output.weight"].T
