"""Llama: Hugging Face (``LlamaForCausalLM``) <-> torchtitan state dicts.

The key map is torchtitan's (``Llama3StateDictAdapter``):

==================================================  ==========================================
Hugging Face                                        torchtitan
==================================================  ==========================================
``model.embed_tokens.weight``                       ``tok_embeddings.weight``
``model.layers.{i}.self_attn.q_proj.weight``        ``layers.{i}.attention.wq.weight`` (*)
``model.layers.{i}.self_attn.k_proj.weight``        ``layers.{i}.attention.wk.weight`` (*)
``model.layers.{i}.self_attn.v_proj.weight``        ``layers.{i}.attention.wv.weight``
``model.layers.{i}.self_attn.o_proj.weight``        ``layers.{i}.attention.wo.weight``
``model.layers.{i}.mlp.gate_proj.weight``           ``layers.{i}.feed_forward.w1.weight``
``model.layers.{i}.mlp.down_proj.weight``           ``layers.{i}.feed_forward.w2.weight``
``model.layers.{i}.mlp.up_proj.weight``             ``layers.{i}.feed_forward.w3.weight``
``model.layers.{i}.input_layernorm.weight``         ``layers.{i}.attention_norm.weight``
``model.layers.{i}.post_attention_layernorm.weight``  ``layers.{i}.ffn_norm.weight``
``model.norm.weight``                               ``norm.weight``
``lm_head.weight``                                  ``output.weight``
==================================================  ==========================================

(*) Hugging Face stores the rows of each q and k head in the half-split
rotary layout, torchtitan (like Meta's checkpoints) in the interleaved one:
the recipe applies :func:`~sdtree.transforms.unpermute_for_rope` going to
torchtitan and, in the inverse, the permutation of Hugging Face's
``convert_llama_weights_to_hf.py`` (:func:`~sdtree.transforms.permute_for_rope`).

Optional fusions (sdtree's names, not torchtitan's; torchtitan's own Llama
keeps them apart): ``fuse_qkv=True`` concatenates wq, wk, wv along dim 0 into
``layers.{i}.attention.wqkv.weight``; ``fuse_w13=True`` concatenates w1
(gate) and w3 (up) into ``layers.{i}.feed_forward.w13.weight``.

Keys outside the map pass through under their own names (so a strict load
names them). Like every tensor transform, the recipes apply to model state
dicts, FQN-keyed and flat optimizer state dicts (the moments are permuted
and fused like their parameters; ``step`` is carried) and
``(model_state_dict, optim_state_dict)`` pairs, and plan meta tensors.
"""

from __future__ import annotations

from typing import Optional

from sdtree.recipes._decoder import ATTENTION_KEYS, check_flag, to_torchtitan
from sdtree.transforms import Transform, fuse

__all__ = ["hf_to_torchtitan"]

FEED_FORWARD_KEYS = {
    "model.layers.{i}.mlp.gate_proj.weight": "layers.{i}.feed_forward.w1.weight",
    "model.layers.{i}.mlp.up_proj.weight": "layers.{i}.feed_forward.w3.weight",
    "model.layers.{i}.mlp.down_proj.weight": "layers.{i}.feed_forward.w2.weight",
}
W1, W3, W13 = "layers.{i}.feed_forward.w1.weight", "layers.{i}.feed_forward.w3.weight", "layers.{i}.feed_forward.w13.weight"


def hf_to_torchtitan(
    *,
    n_heads: int,
    n_kv_heads: int,
    dim: int,
    head_dim: Optional[int] = None,
    fuse_qkv: bool = False,
    fuse_w13: bool = False,
    tie_word_embeddings: bool = False,
) -> Transform:
    """Return the pipeline that converts a Hugging Face Llama state dict to
    torchtitan's: the key map above, the rotary permutation of q and k, and
    the optional fusions.

    >>> import torch
    >>> hf = {
    ...     "model.embed_tokens.weight": torch.empty(10, 8, device="meta"),
    ...     "model.layers.0.self_attn.q_proj.weight": torch.empty(8, 8, device="meta"),
    ...     "model.layers.0.self_attn.k_proj.weight": torch.empty(4, 8, device="meta"),
    ...     "model.layers.0.self_attn.v_proj.weight": torch.empty(4, 8, device="meta"),
    ... }
    >>> t = hf_to_torchtitan(n_heads=2, n_kv_heads=1, dim=8, fuse_qkv=True, tie_word_embeddings=True)
    >>> {k: tuple(v.shape) for k, v in t(hf).items()}
    {'tok_embeddings.weight': (10, 8), 'layers.0.attention.wqkv.weight': (16, 8), 'output.weight': (10, 8)}

    Args:
        n_heads: attention (query) heads.
        n_kv_heads: key/value heads (``n_heads`` without grouped-query attention).
        dim: the model width; the head dimension is ``dim // n_heads``
            unless ``head_dim`` is given.
        head_dim: the width of one head, for models where it is not
            ``dim // n_heads``.
        fuse_qkv: concatenate wq, wk, wv (dim 0, sizes ``n_heads * head_dim``,
            ``n_kv_heads * head_dim`` twice) into ``layers.{i}.attention.wqkv.weight``.
        fuse_w13: concatenate w1 and w3 (dim 0, equal halves) into
            ``layers.{i}.feed_forward.w13.weight``.
        tie_word_embeddings: the Hugging Face side has no ``lm_head.weight``
            (the files ``save_pretrained`` writes for a tied model), and the
            torchtitan side gets ``output.weight``, the embedding tensor
            itself; the inverse drops it again, after checking that it still
            equals the embedding. Leave it False for ``model.state_dict()``
            of a tied model, which holds ``lm_head.weight``: it is renamed
            to ``output.weight`` and still shares the embedding's memory.

    Returns:
        A :class:`~sdtree.transforms.Transform`; its ``inverse()`` converts
        back (torchtitan -> Hugging Face), bit for bit.

    Raises:
        TypeError, ValueError: arguments of the wrong type, or heads that do
            not fit ``dim``.
        TensorMismatchError (when applied): q or k rows are not
            ``n_heads * head_dim`` (``n_kv_heads * head_dim``), or the parts of
            a fusion differ in shape.
        PatternMatchError (when applied): no q/k (or, when fused, w1/w3) key,
            or a layer lacks one of them.
        KeyCollisionError (when applied): with ``tie_word_embeddings``, the
            state dict holds ``lm_head.weight`` as well.
    """
    fn = "llama.hf_to_torchtitan"
    feed_forward = [fuse([W1, W3], W13, sizes="equal")] if check_flag(fn, "fuse_w13", fuse_w13) else []
    return to_torchtitan(
        fn,
        keys={**ATTENTION_KEYS, **FEED_FORWARD_KEYS},
        feed_forward=feed_forward,
        n_heads=n_heads,
        n_kv_heads=n_kv_heads,
        dim=dim,
        head_dim=head_dim,
        fuse_qkv=fuse_qkv,
        tie_word_embeddings=tie_word_embeddings,
    )
