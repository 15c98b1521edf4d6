import torch
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

from sdtree.adapters import index_model
from tests.adapters.models import Net


def _canonical(model):
    return list(index_model(model).entries)


def test_plain_model_fqns_are_state_dict_keys_in_order():
    model = Net()
    index = index_model(model)
    assert list(index.entries) == list(model.state_dict())
    assert list(index.key_to_fqn) == list(model.state_dict())
    assert "blocks.0.cache" not in index.entries  # non-persistent
    assert "extra._extra_state" in index.entries


def test_wrappers_removed_at_any_depth_and_order():
    expected = _canonical(Net())
    torch.manual_seed(0)
    compiled = torch.compile(Net(), backend="eager")
    assert _canonical(compiled) == expected
    inner = Net()
    inner.blocks[0] = checkpoint_wrapper(inner.blocks[0])
    assert _canonical(inner) == expected
    ac_of_compiled = Net()
    ac_of_compiled.blocks[1] = checkpoint_wrapper(torch.compile(ac_of_compiled.blocks[1], backend="eager"))
    assert _canonical(ac_of_compiled) == expected
    compiled_of_ac = Net()
    compiled_of_ac.blocks[1] = torch.compile(checkpoint_wrapper(compiled_of_ac.blocks[1]), backend="eager")
    assert _canonical(torch.compile(compiled_of_ac, backend="eager")) == expected


def test_state_dict_keys_map_to_fqns_under_checkpoint_wrapper():
    model = Net()
    model.blocks[0] = checkpoint_wrapper(model.blocks[0])
    compiled = torch.compile(model, backend="eager")
    index = index_model(compiled)
    assert set(index.key_to_fqn) == set(compiled.state_dict())
    assert index.key_to_fqn["_orig_mod.blocks.0.linear1.weight"] == "blocks.0.linear1.weight"
    assert index.params.attr_to_fqn["_orig_mod.blocks.0._checkpoint_wrapped_module.linear1.weight"] == "blocks.0.linear1.weight"


def test_fqn_modifiers_hide_children():
    class Hidden(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = nn.Linear(2, 2)

        def _fqn_modifiers(self):
            return {"weight": "inner", "bias": "inner"}

    class Outer(nn.Module):
        def __init__(self):
            super().__init__()
            self.layer = Hidden()

    assert _canonical(Outer()) == ["layer.weight", "layer.bias"]
    assert list(index_model(Outer(), "other_name").entries) == ["layer.inner.weight", "layer.inner.bias"]


def test_tied_and_frozen_parameters():
    model = Net(tied=True)
    model.blocks[0].linear1.requires_grad_(False)
    index = index_model(model)
    assert index.params.aliases(index.params.fqn_of_param(model.embed.weight)) == ("embed.weight", "head.weight")
    assert index.params.aliases("head.weight") == ("embed.weight", "head.weight")
    assert index.params.aliases("blocks.0.norm.weight") == ("blocks.0.norm.weight",)
    assert index.params.fqn_of_param(model.head.weight) == "embed.weight"
    assert index.frozen == {"blocks.0.linear1.weight", "blocks.0.linear1.bias"}


def test_index_holds_no_global_cache():
    import gc
    import weakref

    model = Net()
    index_model(model)
    ref = weakref.ref(model)
    del model
    gc.collect()
    assert ref() is None
