"""sdtree.recipes.moe against transformers' MixtralForCausalLM (tiny config,
random init, no download): the per-expert checkpoint layout that
``save_pretrained`` writes, stacked into torchtitan's grouped experts."""

import os
import tempfile

import pytest
import torch
from safetensors.torch import save_file
from transformers import MixtralConfig, MixtralForCausalLM

from sdtree.errors import PatternMatchError
from sdtree.recipes import moe
from sdtree.testing import assert_state_dict_equal
from tests.recipes import hugging_face, torchtitan_reference

N_HEADS, N_KV_HEADS, DIM, HEAD_DIM, LAYERS, VOCAB, HIDDEN, EXPERTS, TOP_K = 4, 2, 64, 16, 2, 128, 96, 4, 2
SHAPE = dict(n_heads=N_HEADS, n_kv_heads=N_KV_HEADS, dim=DIM)
HF_MOE = "model.layers.{i}.block_sparse_moe"


def _config():
    return MixtralConfig(
        hidden_size=DIM,
        intermediate_size=HIDDEN,
        num_hidden_layers=LAYERS,
        num_attention_heads=N_HEADS,
        num_key_value_heads=N_KV_HEADS,
        vocab_size=VOCAB,
        num_local_experts=EXPERTS,
        num_experts_per_tok=TOP_K,
    )


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return MixtralForCausalLM(_config()).eval()


@pytest.fixture(scope="module")
def files(model):
    """The state dict as ``save_pretrained`` writes it: one tensor per expert."""
    return hugging_face.saved_state_dict(model)


def test_the_files_hold_one_tensor_per_expert(files):
    assert f"{HF_MOE.format(i=1)}.experts.{EXPERTS - 1}.w2.weight" in files
    assert not any("gate_up_proj" in k for k in files)


def test_experts_are_stacked_in_order_as_transformers_itself_stacks_them(model, files):
    tt = moe.mixtral_to_torchtitan(**SHAPE)(files)
    live = model.state_dict()  # transformers 5 fuses the experts in memory: gate_up_proj = [w1 | w3] per expert
    for i in range(LAYERS):
        experts = f"layers.{i}.moe.experts"
        gate_up = live[f"model.layers.{i}.mlp.experts.gate_up_proj"]
        assert tt[f"{experts}.w1"].shape == (EXPERTS, HIDDEN, DIM) and tt[f"{experts}.w2"].shape == (EXPERTS, DIM, HIDDEN)
        assert torch.equal(tt[f"{experts}.w1"], gate_up[:, :HIDDEN])
        assert torch.equal(tt[f"{experts}.w3"], gate_up[:, HIDDEN:])
        assert torch.equal(tt[f"{experts}.w2"], live[f"model.layers.{i}.mlp.experts.down_proj"])
        for e in range(EXPERTS):
            assert torch.equal(tt[f"{experts}.w2"][e], files[f"{HF_MOE.format(i=i)}.experts.{e}.w2.weight"])
        assert tt[f"layers.{i}.moe.router.gate.weight"] is files[f"{HF_MOE.format(i=i)}.gate.weight"]
    assert not any("block_sparse_moe" in k or k.startswith("model.") for k in tt)


@pytest.mark.parametrize("fuse_qkv", [False, True])
def test_torchtitan_layout_computes_mixtrals_logits(model, files, tokens, fuse_qkv):
    tt = moe.mixtral_to_torchtitan(**SHAPE, fuse_qkv=fuse_qkv)(files)
    config = model.config
    with torch.no_grad():
        ours = torchtitan_reference.logits(
            tt, tokens, n_heads=N_HEADS, n_kv_heads=N_KV_HEADS, head_dim=HEAD_DIM, eps=config.rms_norm_eps,
            theta=config.rope_parameters["rope_theta"], top_k=TOP_K,
        )
    torch.testing.assert_close(ours, hugging_face.logits(model, tokens), rtol=1e-4, atol=1e-5)


def test_round_trip_loads_with_identical_logits(model, files, tokens):
    recipe = moe.mixtral_to_torchtitan(**SHAPE, fuse_qkv=True)
    back = recipe.inverse()(recipe(files))
    assert_state_dict_equal(back, files)
    with tempfile.TemporaryDirectory() as directory:
        model.config.save_pretrained(directory)
        save_file(back, os.path.join(directory, "model.safetensors"), metadata={"format": "pt"})
        loaded = MixtralForCausalLM.from_pretrained(directory).eval()
    assert torch.equal(hugging_face.logits(loaded, tokens), hugging_face.logits(model, tokens))


def test_the_experts_recipe_alone_leaves_the_rest_to_another(files):
    recipe = moe.mixtral_experts_to_torchtitan()
    out = recipe(files)
    assert "model.layers.0.self_attn.q_proj.weight" in out and "layers.0.moe.experts.w3" in out
    assert "layers.1.moe.router.gate.weight" in out
    assert_state_dict_equal(recipe.inverse()(out), files)
    assert repr(recipe) == (
        "stack('model.layers.{i}.block_sparse_moe.experts.{e}.w1.weight', 'layers.{i}.moe.experts.w1', over='e') >> "
        "stack('model.layers.{i}.block_sparse_moe.experts.{e}.w2.weight', 'layers.{i}.moe.experts.w2', over='e') >> "
        "stack('model.layers.{i}.block_sparse_moe.experts.{e}.w3.weight', 'layers.{i}.moe.experts.w3', over='e') >> "
        "rename({'model.layers.{i}.block_sparse_moe.gate.weight': 'layers.{i}.moe.router.gate.weight'})"
    )


def test_a_missing_expert_is_an_error_naming_the_gap(files):
    gap = {k: v for k, v in files.items() if ".experts.2." not in k or not k.startswith("model.layers.0.")}
    with pytest.raises(PatternMatchError, match=r"at \{i\}=0: \{e\} indices \[0, 1, 3\] are not 0..2 \(missing \[2\]\)"):
        moe.mixtral_to_torchtitan(**SHAPE)(gap)


def test_meta_tensors_are_planned_to_the_shapes_of_the_real_conversion(files):
    recipe = moe.mixtral_to_torchtitan(**SHAPE, fuse_qkv=True)
    real = recipe(files)
    planned = recipe({k: v.to("meta") for k, v in files.items()})
    assert sorted(planned) == sorted(real)
    assert all(planned[k].is_meta and planned[k].shape == real[k].shape for k in real)
