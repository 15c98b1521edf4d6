"""sdtree.recipes.llama against transformers' LlamaForCausalLM (tiny configs,
random init, no download): torchtitan's keys, Hugging Face's rotary
permutation, logits computed on the torchtitan layout, round trips of the
model and its AdamW state, tied embeddings."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import sdtree
from sdtree.errors import KeyCollisionError, PatternMatchError, TensorMismatchError
from sdtree.recipes import llama, untie_weights
from sdtree.testing import assert_state_dict_equal
from sdtree.transforms import flatten_optimizer
from tests.recipes import hugging_face, torchtitan_reference

N_HEADS, N_KV_HEADS, DIM, HEAD_DIM, LAYERS, VOCAB, HIDDEN = 4, 2, 64, 16, 2, 128, 96
SHAPE = dict(n_heads=N_HEADS, n_kv_heads=N_KV_HEADS, dim=DIM)
FUSIONS = [dict(), dict(fuse_qkv=True), dict(fuse_w13=True), dict(fuse_qkv=True, fuse_w13=True)]
FUSION_IDS = ["unfused", "qkv", "w13", "qkv+w13"]


def _config(tied=False):
    return LlamaConfig(
        hidden_size=DIM,
        intermediate_size=HIDDEN,
        num_hidden_layers=LAYERS,
        num_attention_heads=N_HEADS,
        num_key_value_heads=N_KV_HEADS,
        vocab_size=VOCAB,
        tie_word_embeddings=tied,
    )


def _model(tied=False, seed=0):
    torch.manual_seed(seed)
    return LlamaForCausalLM(_config(tied)).eval()


@pytest.fixture(scope="module")
def model():
    return _model()


@pytest.fixture(scope="module")
def tied_model():
    return _model(tied=True, seed=1)


def _reference_logits(tt, tokens, config):
    with torch.no_grad():
        return torchtitan_reference.logits(
            tt, tokens, n_heads=N_HEADS, n_kv_heads=N_KV_HEADS, head_dim=HEAD_DIM, eps=config.rms_norm_eps
        )


def _loaded(state_dict, tied=False):
    fresh = _model(tied, seed=99)
    fresh.load_state_dict(state_dict, strict=True)
    return fresh


def hf_permute(w, n_heads, dim1, dim2):
    """``permute`` of transformers' convert_llama_weights_to_hf.py (Meta's layout -> Hugging Face's), verbatim."""
    return w.view(n_heads, dim1 // n_heads // 2, 2, dim2).transpose(1, 2).reshape(dim1, dim2)


def test_keys_are_torchtitans_llama3_keys_and_unpermuted_tensors_are_shared(model):
    hf = model.state_dict()
    tt = llama.hf_to_torchtitan(**SHAPE)(hf)
    layer = [
        "attention.wq.weight", "attention.wk.weight", "attention.wv.weight", "attention.wo.weight",
        "feed_forward.w1.weight", "feed_forward.w3.weight", "feed_forward.w2.weight",
        "attention_norm.weight", "ffn_norm.weight",
    ]
    expected = ["tok_embeddings.weight", *(f"layers.{i}.{k}" for i in range(LAYERS) for k in layer), "norm.weight", "output.weight"]
    assert list(tt) == expected
    assert tt["layers.1.feed_forward.w3.weight"] is hf["model.layers.1.mlp.up_proj.weight"]
    assert tt["layers.1.feed_forward.w2.weight"] is hf["model.layers.1.mlp.down_proj.weight"]
    assert tt["output.weight"] is hf["lm_head.weight"]


def test_q_and_k_are_permuted_by_hugging_faces_conversion_formula(model):
    hf = model.state_dict()
    tt = llama.hf_to_torchtitan(**SHAPE)(hf)
    for i in range(LAYERS):
        wq, wk = tt[f"layers.{i}.attention.wq.weight"], tt[f"layers.{i}.attention.wk.weight"]
        assert torch.equal(hf_permute(wq, N_HEADS, DIM, DIM), hf[f"model.layers.{i}.self_attn.q_proj.weight"])
        assert torch.equal(hf_permute(wk, N_KV_HEADS, N_KV_HEADS * HEAD_DIM, DIM), hf[f"model.layers.{i}.self_attn.k_proj.weight"])
        assert not torch.equal(wq, hf[f"model.layers.{i}.self_attn.q_proj.weight"])


@pytest.mark.parametrize("fusion", FUSIONS, ids=FUSION_IDS)
def test_torchtitan_layout_computes_hugging_faces_logits(model, tokens, fusion):
    tt = llama.hf_to_torchtitan(**SHAPE, **fusion)(model.state_dict())
    assert ("layers.0.attention.wqkv.weight" in tt) == bool(fusion.get("fuse_qkv"))
    assert ("layers.0.feed_forward.w13.weight" in tt) == bool(fusion.get("fuse_w13"))
    torch.testing.assert_close(_reference_logits(tt, tokens, model.config), hugging_face.logits(model, tokens), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("fusion", FUSIONS, ids=FUSION_IDS)
def test_round_trip_loads_with_identical_logits(model, tokens, fusion):
    hf = model.state_dict()
    recipe = llama.hf_to_torchtitan(**SHAPE, **fusion)
    back = recipe.inverse()(recipe(hf))
    assert_state_dict_equal(back, hf)
    assert torch.equal(hugging_face.logits(_loaded(back), tokens), hugging_face.logits(model, tokens))


def test_fused_tensors_are_the_parts_in_order(model):
    tt = llama.hf_to_torchtitan(**SHAPE)(model.state_dict())
    fused = llama.hf_to_torchtitan(**SHAPE, fuse_qkv=True, fuse_w13=True)(model.state_dict())
    for i in range(LAYERS):
        parts = [tt[f"layers.{i}.attention.{w}.weight"] for w in ("wq", "wk", "wv")]
        assert torch.equal(fused[f"layers.{i}.attention.wqkv.weight"], torch.cat(parts))
        gate_up = [tt[f"layers.{i}.feed_forward.{w}.weight"] for w in ("w1", "w3")]
        assert torch.equal(fused[f"layers.{i}.feed_forward.w13.weight"], torch.cat(gate_up))
    assert len(fused) == len(tt) - 3 * LAYERS


def _adamw_state(model, tokens):
    """The model's and its AdamW optimizer's state after two steps, FQN-keyed."""
    shadow = _model(seed=5)
    shadow.load_state_dict(model.state_dict())
    optim = torch.optim.AdamW(shadow.parameters(), lr=1e-2)
    for _ in range(2):
        shadow(tokens, labels=tokens).loss.backward()
        optim.step()
        optim.zero_grad()
    return sdtree.get_model_state_dict(shadow), sdtree.get_optimizer_state_dict(shadow, optim)


def test_model_and_adamw_state_round_trip_bitwise_with_moments_fused_like_their_parameters(model, tokens):
    model_sd, optim_sd = _adamw_state(model, tokens)
    recipe = llama.hf_to_torchtitan(**SHAPE, fuse_qkv=True, fuse_w13=True)
    tt_model, tt_optim = recipe((model_sd, optim_sd))
    assert list(tt_optim["state"]) == list(tt_model)
    assert tt_optim["param_groups"][0]["params"] == list(tt_model)
    hf_state, tt_state = optim_sd["state"], tt_optim["state"]
    for i in range(LAYERS):
        hf_layer, fused = f"model.layers.{i}", tt_state[f"layers.{i}.attention.wqkv.weight"]
        for name in ("exp_avg", "exp_avg_sq"):
            q, k, v = (hf_state[f"{hf_layer}.self_attn.{p}_proj.weight"][name] for p in "qkv")
            # torchtitan's Llama3StateDictAdapter._reverse_permute, for moments as for weights
            q = q.view(N_HEADS, 2, HEAD_DIM // 2, DIM).transpose(1, 2).reshape(DIM, DIM)
            k = k.view(N_KV_HEADS, 2, HEAD_DIM // 2, DIM).transpose(1, 2).reshape(N_KV_HEADS * HEAD_DIM, DIM)
            assert torch.equal(fused[name], torch.cat([q, k, v]))
            gate, up = (hf_state[f"{hf_layer}.mlp.{p}_proj.weight"][name] for p in ("gate", "up"))
            assert torch.equal(tt_state[f"layers.{i}.feed_forward.w13.weight"][name], torch.cat([gate, up]))
        assert torch.equal(fused["step"], hf_state[f"{hf_layer}.self_attn.q_proj.weight"]["step"])
    back_model, back_optim = recipe.inverse()((tt_model, tt_optim))
    assert_state_dict_equal(back_model, model_sd)
    assert_state_dict_equal(back_optim, optim_sd)
    assert back_optim["param_groups"][0]["params"] == optim_sd["param_groups"][0]["params"]
    assert_state_dict_equal(recipe.inverse()(recipe(optim_sd)), optim_sd)  # the optimizer alone too


def test_flat_optimizer_state_converts_as_the_nested_one_does(model, tokens):
    model_sd, optim_sd = _adamw_state(model, tokens)
    flat = flatten_optimizer()(optim_sd)
    recipe = llama.hf_to_torchtitan(**SHAPE, fuse_qkv=True, fuse_w13=True)
    assert_state_dict_equal(recipe(flat), flatten_optimizer()(recipe(optim_sd)))
    assert_state_dict_equal(recipe.inverse()(recipe((model_sd, flat))[1]), flat)
    tied = llama.hf_to_torchtitan(**SHAPE, tie_word_embeddings=True)
    with pytest.raises(TensorMismatchError, match=r"the optimizer has a parameter 'output.weight' of its own"):
        tied(flat)  # an untied model: lm_head has moments of its own


def test_tied_model_state_dict_keeps_lm_head_as_output_sharing_the_embedding(tied_model, tokens):
    hf = tied_model.state_dict()
    assert hf["lm_head.weight"].data_ptr() == hf["model.embed_tokens.weight"].data_ptr()
    recipe = llama.hf_to_torchtitan(**SHAPE)
    tt = recipe(hf)
    assert tt["output.weight"].data_ptr() == tt["tok_embeddings.weight"].data_ptr()
    torch.testing.assert_close(_reference_logits(tt, tokens, tied_model.config), hugging_face.logits(tied_model, tokens), rtol=1e-4, atol=1e-5)
    back = recipe.inverse()(tt)
    assert_state_dict_equal(back, hf)
    assert torch.equal(hugging_face.logits(_loaded(back, tied=True), tokens), hugging_face.logits(tied_model, tokens))


def test_tied_checkpoint_without_lm_head_gets_output_from_the_embedding(tied_model, tokens):
    files = hugging_face.saved_state_dict(tied_model)
    assert "lm_head.weight" not in files and "model.embed_tokens.weight" in files
    recipe = llama.hf_to_torchtitan(**SHAPE, fuse_qkv=True, fuse_w13=True, tie_word_embeddings=True)
    tt = recipe(files)
    assert list(tt)[-1] == "output.weight" and tt["output.weight"] is tt["tok_embeddings.weight"]
    torch.testing.assert_close(_reference_logits(tt, tokens, tied_model.config), hugging_face.logits(tied_model, tokens), rtol=1e-4, atol=1e-5)
    back = recipe.inverse()(tt)
    assert_state_dict_equal(back, files)


def test_tie_word_embeddings_refuses_a_state_dict_that_holds_lm_head(tied_model):
    recipe = llama.hf_to_torchtitan(**SHAPE, tie_word_embeddings=True)
    with pytest.raises(KeyCollisionError, match=r"'output.weight' exists already.*tie_word_embeddings=False"):
        recipe(tied_model.state_dict())


def test_untying_refuses_an_output_embedding_of_its_own(model):
    tt = llama.hf_to_torchtitan(**SHAPE)(model.state_dict())
    back = llama.hf_to_torchtitan(**SHAPE, tie_word_embeddings=True).inverse()
    with pytest.raises(TensorMismatchError, match=r"'output.weight' differs from 'tok_embeddings.weight' \(first at index \(0, 0\)\)"):
        back(tt)
    with pytest.raises(PatternMatchError, match=r"no 'output.weight' to untie"):
        back({k: v for k, v in tt.items() if k != "output.weight"})
    osd = {"state": {"output.weight": {"step": torch.tensor(1.0)}}, "param_groups": [{"params": ["output.weight"], "lr": 0.1}]}
    with pytest.raises(TensorMismatchError, match=r"the optimizer has a parameter 'output.weight' of its own"):
        untie_weights("output.weight", "tok_embeddings.weight")(osd)


def test_wrong_head_counts_are_an_error_naming_the_key(model):
    with pytest.raises(TensorMismatchError, match=r"'layers.0.attention.wk.weight' \(32, 64\): dim 0 is 32, not n_heads=4 x head_dim=16"):
        llama.hf_to_torchtitan(n_heads=4, n_kv_heads=4, dim=DIM)(model.state_dict())


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match=r"dim=60 does not divide by n_heads=8; pass head_dim="):
        llama.hf_to_torchtitan(n_heads=8, n_kv_heads=2, dim=60)
    with pytest.raises(ValueError, match=r"n_heads=6 is not a multiple of n_kv_heads=4"):
        llama.hf_to_torchtitan(n_heads=6, n_kv_heads=4, dim=48)
    with pytest.raises(ValueError, match=r"head_dim=9 is odd"):
        llama.hf_to_torchtitan(n_heads=2, n_kv_heads=2, dim=64, head_dim=9)
    with pytest.raises(TypeError, match=r"fuse_qkv must be a bool, got fuse_qkv='yes'"):
        llama.hf_to_torchtitan(**SHAPE, fuse_qkv="yes")
    with pytest.raises(TypeError, match=r"n_kv_heads must be an int"):
        llama.hf_to_torchtitan(n_heads=4, n_kv_heads=None, dim=DIM)


def test_explicit_head_dim_for_heads_narrower_than_dim_over_n_heads(tokens):
    torch.manual_seed(3)
    config = LlamaConfig(
        hidden_size=DIM, intermediate_size=HIDDEN, num_hidden_layers=1, num_attention_heads=N_HEADS,
        num_key_value_heads=N_KV_HEADS, head_dim=8, vocab_size=VOCAB,
    )
    narrow = LlamaForCausalLM(config).eval()
    tt = llama.hf_to_torchtitan(**SHAPE, head_dim=8, fuse_qkv=True)(narrow.state_dict())
    assert tt["layers.0.attention.wqkv.weight"].shape == (N_HEADS * 8 + 2 * N_KV_HEADS * 8, DIM)
    with torch.no_grad():
        ours = torchtitan_reference.logits(tt, tokens, n_heads=N_HEADS, n_kv_heads=N_KV_HEADS, head_dim=8, eps=config.rms_norm_eps)
    torch.testing.assert_close(ours, hugging_face.logits(narrow, tokens), rtol=1e-4, atol=1e-5)


def test_meta_tensors_are_planned_to_the_shapes_of_the_real_conversion(model):
    hf = model.state_dict()
    recipe = llama.hf_to_torchtitan(**SHAPE, fuse_qkv=True, fuse_w13=True)
    real = recipe(hf)
    planned = recipe({k: v.to("meta") for k, v in hf.items()})
    assert list(planned) == list(real)
    assert all(planned[k].is_meta and planned[k].shape == real[k].shape and planned[k].dtype == real[k].dtype for k in real)


def test_recipe_is_readable_data_and_its_inverse_the_reversed_inverses():
    recipe = llama.hf_to_torchtitan(**SHAPE, fuse_qkv=True, tie_word_embeddings=True)
    steps = repr(recipe).split(" >> ")
    assert steps[0].startswith("rename({'model.embed_tokens.weight': 'tok_embeddings.weight', ")
    assert steps[1:] == [
        "unpermute_for_rope('layers.{i}.attention.wq.weight', n_heads=4, head_dim=16)",
        "unpermute_for_rope('layers.{i}.attention.wk.weight', n_heads=2, head_dim=16)",
        "fuse(('layers.{i}.attention.wq.weight', 'layers.{i}.attention.wk.weight', 'layers.{i}.attention.wv.weight'), "
        "'layers.{i}.attention.wqkv.weight', sizes=(64, 32, 32))",
        "tie_weights('tok_embeddings.weight', 'output.weight')",
    ]
    inverse = repr(recipe.inverse()).split(" >> ")
    assert inverse[:-1] == [
        "untie_weights('output.weight', 'tok_embeddings.weight')",
        "split('layers.{i}.attention.wqkv.weight', ('layers.{i}.attention.wq.weight', 'layers.{i}.attention.wk.weight', "
        "'layers.{i}.attention.wv.weight'), sizes=(64, 32, 32))",
        "permute_for_rope('layers.{i}.attention.wk.weight', n_heads=2, head_dim=16)",
        "permute_for_rope('layers.{i}.attention.wq.weight', n_heads=4, head_dim=16)",
    ]
    assert inverse[-1].startswith("rename({'tok_embeddings.weight': 'model.embed_tokens.weight', ")
