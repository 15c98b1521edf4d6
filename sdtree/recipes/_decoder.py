"""What the Llama-family recipes share: the attention, embedding and norm
keys, the rotary permutation of q and k, the optional q/k/v fusion and the
tied output embedding. Each recipe adds its feed-forward keys and steps.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Optional

from sdtree.errors import InvalidRuleError
from sdtree.recipes._tying import tie_weights
from sdtree.transforms import Transform, fuse, pipeline, rename, unpermute_for_rope

__all__ = ["ATTENTION_KEYS", "head_dim_of", "to_torchtitan", "check_flag"]

# Hugging Face -> torchtitan, as in torchtitan's Llama3StateDictAdapter.from_hf_map
ATTENTION_KEYS: Mapping[str, str] = {
    "model.embed_tokens.weight": "tok_embeddings.weight",
    "model.layers.{i}.self_attn.q_proj.weight": "layers.{i}.attention.wq.weight",
    "model.layers.{i}.self_attn.k_proj.weight": "layers.{i}.attention.wk.weight",
    "model.layers.{i}.self_attn.v_proj.weight": "layers.{i}.attention.wv.weight",
    "model.layers.{i}.self_attn.o_proj.weight": "layers.{i}.attention.wo.weight",
    "model.layers.{i}.input_layernorm.weight": "layers.{i}.attention_norm.weight",
    "model.layers.{i}.post_attention_layernorm.weight": "layers.{i}.ffn_norm.weight",
    "model.norm.weight": "norm.weight",
    "lm_head.weight": "output.weight",
}

WQ, WK, WV = (f"layers.{{i}}.attention.{w}.weight" for w in ("wq", "wk", "wv"))
WQKV = "layers.{i}.attention.wqkv.weight"
EMBEDDING, OUTPUT = "tok_embeddings.weight", "output.weight"


def _positive_int(fn: str, name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{fn}: {name} must be an int, got {name}={value!r}.")
    if value <= 0:
        raise InvalidRuleError(f"{fn}: {name} must be positive, got {name}={value!r}.")
    return value


def head_dim_of(fn: str, n_heads: int, n_kv_heads: int, dim: int, head_dim: Optional[int]) -> int:
    """Check the attention shape; return the head dimension."""
    _positive_int(fn, "n_heads", n_heads)
    _positive_int(fn, "n_kv_heads", n_kv_heads)
    _positive_int(fn, "dim", dim)
    if n_heads % n_kv_heads:
        raise InvalidRuleError(
            f"{fn}: n_heads={n_heads} is not a multiple of n_kv_heads={n_kv_heads}; "
            "grouped-query attention shares each k/v head among n_heads // n_kv_heads query heads."
        )
    if head_dim is None:
        if dim % n_heads:
            raise InvalidRuleError(
                f"{fn}: dim={dim} does not divide by n_heads={n_heads}; pass head_dim= for models whose "
                "heads are not dim // n_heads wide."
            )
        head_dim = dim // n_heads
    _positive_int(fn, "head_dim", head_dim)
    if head_dim % 2:
        raise InvalidRuleError(f"{fn}: head_dim={head_dim} is odd; rotary embeddings pair the dimensions of a head.")
    return head_dim


def to_torchtitan(
    fn: str,
    *,
    keys: Mapping[str, str],
    feed_forward: Sequence[Transform],
    n_heads: int,
    n_kv_heads: int,
    dim: int,
    head_dim: Optional[int],
    fuse_qkv: bool,
    tie_word_embeddings: bool,
) -> Transform:
    """Check the arguments of the recipe ``fn``; return its pipeline: rename
    ``keys``, unpermute q and k, fuse q/k/v, then ``feed_forward``, then tie.

    The order bounds memory: the permuted q and k, the only intermediate
    tensors, are freed once the q/k/v fusion returns, before the feed-forward
    steps add their (larger) outputs.
    """
    head_dim = head_dim_of(fn, n_heads, n_kv_heads, dim, head_dim)
    steps = [
        rename(dict(keys)),
        unpermute_for_rope(WQ, n_heads=n_heads, head_dim=head_dim),
        unpermute_for_rope(WK, n_heads=n_kv_heads, head_dim=head_dim),
    ]
    if check_flag(fn, "fuse_qkv", fuse_qkv):
        q, kv = n_heads * head_dim, n_kv_heads * head_dim
        steps.append(fuse([WQ, WK, WV], WQKV, sizes=(q, kv, kv)))
    steps.extend(feed_forward)
    if check_flag(fn, "tie_word_embeddings", tie_word_embeddings):
        steps.append(tie_weights(EMBEDDING, OUTPUT))
    return pipeline(*steps)


def check_flag(fn: str, name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{fn}: {name} must be a bool, got {name}={value!r}.")
    return value
