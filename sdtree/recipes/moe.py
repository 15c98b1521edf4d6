"""Mixture-of-experts: Mixtral-style experts, one key per expert, stacked
into torchtitan's grouped experts.

Hugging Face's Mixtral checkpoints (the safetensors files on the Hub and
those ``save_pretrained`` writes) keep one tensor per expert; torchtitan's
``GroupedExperts`` holds one ``(num_experts, ...)`` tensor per projection,
and routes with ``layers.{i}.moe.router.gate.weight``:

=============================================================  ====================================
Hugging Face (per expert ``{e}``)                              torchtitan
=============================================================  ====================================
``model.layers.{i}.block_sparse_moe.experts.{e}.w1.weight``    ``layers.{i}.moe.experts.w1``
``model.layers.{i}.block_sparse_moe.experts.{e}.w2.weight``    ``layers.{i}.moe.experts.w2``
``model.layers.{i}.block_sparse_moe.experts.{e}.w3.weight``    ``layers.{i}.moe.experts.w3``
``model.layers.{i}.block_sparse_moe.gate.weight``              ``layers.{i}.moe.router.gate.weight``
=============================================================  ====================================

The experts are stacked along a new dim 0 in the order of ``{e}``, with no
transpose: torchtitan's ``w1`` and ``w3`` are ``(num_experts, hidden_dim,
dim)`` and ``w2`` is ``(num_experts, dim, hidden_dim)``, each expert's slice
oriented like the ``nn.Linear`` weight it replaces (torchtitan's
``GroupedExperts`` computes ``x @ w1[e].T``). The keys without ``.weight``
are torchtitan's (its DeepSeek-V3 and Qwen3 adapters use the same).

transformers 5 builds Mixtral models with experts already fused in memory
(``mlp.experts.gate_up_proj``); its ``save_pretrained`` writes the
per-expert layout above, which is what these recipes read.
"""

from __future__ import annotations

from typing import Optional

from sdtree.recipes._decoder import ATTENTION_KEYS, to_torchtitan
from sdtree.transforms import Transform, pipeline, rename, stack

__all__ = ["mixtral_experts_to_torchtitan", "mixtral_to_torchtitan"]

_HF_MOE = "model.layers.{i}.block_sparse_moe"
ROUTER_KEYS = {f"{_HF_MOE}.gate.weight": "layers.{i}.moe.router.gate.weight"}


def _stack_experts() -> list[Transform]:
    return [stack(f"{_HF_MOE}.experts.{{e}}.{w}.weight", f"layers.{{i}}.moe.experts.{w}", over="e") for w in ("w1", "w2", "w3")]


def mixtral_experts_to_torchtitan() -> Transform:
    """Return the pipeline that converts only the mixture-of-experts blocks of
    a Mixtral state dict to torchtitan's (stacked experts, renamed router),
    to compose with a recipe for the rest of a model.

    >>> import torch
    >>> hf = {f"model.layers.0.block_sparse_moe.experts.{e}.{w}.weight": torch.zeros(3, 2)
    ...       for e in range(4) for w in ("w1", "w2", "w3")}
    >>> hf["model.layers.0.block_sparse_moe.gate.weight"] = torch.zeros(4, 2)
    >>> {k: tuple(v.shape) for k, v in mixtral_experts_to_torchtitan()(hf).items()}
    {'layers.0.moe.experts.w1': (4, 3, 2), 'layers.0.moe.experts.w2': (4, 3, 2), 'layers.0.moe.experts.w3': (4, 3, 2), 'layers.0.moe.router.gate.weight': (4, 2)}

    Raises (when applied):
        PatternMatchError: no expert keys, or expert indices of a layer that
            are not 0..n-1.
        TensorMismatchError: experts of one layer differ in shape or dtype.
    """
    return pipeline(*_stack_experts(), rename(ROUTER_KEYS))


def mixtral_to_torchtitan(
    *,
    n_heads: int,
    n_kv_heads: int,
    dim: int,
    head_dim: Optional[int] = None,
    fuse_qkv: bool = False,
    tie_word_embeddings: bool = False,
) -> Transform:
    """Return the pipeline that converts a Hugging Face Mixtral state dict to
    torchtitan's: the attention, embedding and norm keys as
    :func:`sdtree.recipes.llama.hf_to_torchtitan` maps them (with the rotary
    permutation of q and k, and optional ``fuse_qkv``), the experts stacked
    and the router renamed as in the table above.

    The arguments are those of :func:`sdtree.recipes.llama.hf_to_torchtitan`;
    its ``inverse()`` converts back, bit for bit.
    """
    return to_torchtitan(
        "moe.mixtral_to_torchtitan",
        keys={**ATTENTION_KEYS, **ROUTER_KEYS},
        feed_forward=_stack_experts(),
        n_heads=n_heads,
        n_kv_heads=n_kv_heads,
        dim=dim,
        head_dim=head_dim,
        fuse_qkv=fuse_qkv,
        tie_word_embeddings=tie_word_embeddings,
    )
