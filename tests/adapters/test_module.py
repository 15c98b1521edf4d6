import warnings

import pytest
import torch
from torch import nn
from torch.distributed.checkpoint import state_dict as dsd

import sdtree
from sdtree import StateDictOptions
from sdtree.errors import IncompatibleStateDictError
from sdtree.testing import assert_state_dict_equal
from tests.adapters.models import Net, make, snapshot_module, train
from tests.adapters.setups import SETUPS, build

OPTIONS = {
    "default": {},
    "ignore_frozen": {"ignore_frozen_params": True},
    "cpu_offload": {"cpu_offload": True},
    "full": {"full_state_dict": True},
    "full_cpu": {"full_state_dict": True, "cpu_offload": True},
}


@pytest.mark.parametrize("setup", SETUPS)
@pytest.mark.parametrize("opts", sorted(OPTIONS))
def test_get_model_state_dict_matches_torch(setup, opts):
    model, optim = build(setup)
    train(model, optim)
    ours = sdtree.get_model_state_dict(model, options=StateDictOptions(**OPTIONS[opts]))
    theirs = dsd.get_model_state_dict(model, options=dsd.StateDictOptions(**OPTIONS[opts]))
    if setup == "ac_of_compile":
        # torch keeps '_orig_mod.' when compile sits inside a checkpoint wrapper
        # ('blocks.0._orig_mod.scale'); the canonical FQN has no wrapper segment.
        theirs = {k.replace("_orig_mod.", ""): v for k, v in theirs.items()}
    assert list(ours) == list(theirs)
    assert_state_dict_equal(ours, theirs)


def test_get_model_state_dict_accepts_torch_options_and_leaves_model_alone():
    model, optim = make(frozen=True)
    train(model, optim)
    before = snapshot_module(model)
    sd = sdtree.get_model_state_dict(model, options=dsd.StateDictOptions(ignore_frozen_params=True))
    assert "blocks.0.linear1.weight" not in sd and "blocks.0.linear2.weight" in sd
    after = snapshot_module(model)
    assert before.keys() == after.keys()
    for key in before:
        assert (torch.equal(before[key], after[key]) if isinstance(before[key], torch.Tensor) else before[key] == after[key]), key


def test_non_persistent_buffers_and_extra_state():
    model = Net()
    model.extra.calls = 7
    sd = sdtree.get_model_state_dict(model)
    assert "blocks.0.cache" not in sd
    assert sd["extra._extra_state"] == {"calls": 7}
    fresh = Net()
    sdtree.set_model_state_dict(fresh, sd)
    assert fresh.extra.calls == 7


def test_extra_state_given_to_a_class_after_its_first_use():
    """As torch's test_extra_state does: the class gains get/set_extra_state
    once instances exist and have been saved."""

    class Late(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = nn.Parameter(torch.ones(2))

    model = Late()
    assert list(sdtree.get_model_state_dict(model)) == ["w"]
    loaded = []
    Late.get_extra_state = lambda self: "late"
    Late.set_extra_state = lambda self, state: loaded.append(state)
    sd = sdtree.get_model_state_dict(model)
    assert list(sd) == list(model.state_dict()) == ["w", "_extra_state"] and sd["_extra_state"] == "late"
    sdtree.set_model_state_dict(model, sd)
    assert loaded == ["late"]


@pytest.mark.parametrize("setup", SETUPS)
def test_round_trip_restores_model_exactly(setup):
    model, optim = build(setup, seed=0)
    train(model, optim)
    sd = sdtree.get_model_state_dict(model)
    fresh, _ = build(setup, seed=1)
    result = sdtree.set_model_state_dict(fresh, sd)
    assert result.missing_keys == [] and result.unexpected_keys == []
    assert_state_dict_equal(sdtree.get_model_state_dict(fresh), sd)
    assert_state_dict_equal(fresh.state_dict(), model.state_dict())


def test_set_model_state_dict_matches_torch_strict_false():
    model, _ = make()
    sd = sdtree.get_model_state_dict(model)
    first = next(iter(sd))
    partial = {k: v for k, v in sd.items() if k != first}
    partial["abc"] = torch.zeros(3)
    ours_model, _ = make(seed=1)
    theirs_model, _ = make(seed=1)
    ours = sdtree.set_model_state_dict(ours_model, partial, options=StateDictOptions(strict=False))
    theirs = dsd.set_model_state_dict(theirs_model, dict(partial), options=dsd.StateDictOptions(strict=False))
    assert ours.missing_keys == theirs.missing_keys == [first]
    assert ours.unexpected_keys == theirs.unexpected_keys == ["abc"]
    assert_state_dict_equal(ours_model.state_dict(), theirs_model.state_dict())


def test_strict_errors_say_missing_and_unexpected_key():
    model, _ = make()
    sd = sdtree.get_model_state_dict(model)
    with pytest.raises(RuntimeError, match=r"Unexpected key\(s\) in state_dict: 'abc'.*Nothing was written.*strict=False"):
        sdtree.set_model_state_dict(model, {**sd, "abc": torch.zeros(1)})
    first = next(iter(sd))
    with pytest.raises(IncompatibleStateDictError, match=rf"Missing key\(s\) in state_dict: '{first}'"):
        sdtree.set_model_state_dict(model, {k: v for k, v in sd.items() if k != first})


def test_failing_set_leaves_model_bit_identical():
    model, optim = make()
    train(model, optim)
    before = snapshot_module(model)
    fresh, _ = make(seed=3)
    sd = sdtree.get_model_state_dict(fresh)
    bad = dict(sd)
    bad["head.weight"] = torch.zeros(3, 3)  # wrong shape, late in the model
    with pytest.raises(IncompatibleStateDictError, match=r"'head.weight': expected shape \(16, 8\), found \(3, 3\)"):
        sdtree.set_model_state_dict(model, bad)
    bad["head.weight"] = torch.zeros(16, 8, dtype=torch.int64)
    with pytest.raises(IncompatibleStateDictError, match=r"expected dtype torch.float32 .*found torch.int64"):
        sdtree.set_model_state_dict(model, bad)
    bad["head.weight"] = [[0.0]]
    with pytest.raises(IncompatibleStateDictError, match=r"expected a tensor, found list"):
        sdtree.set_model_state_dict(model, bad)
    after = snapshot_module(model)
    for key in before:
        assert (torch.equal(before[key], after[key]) if isinstance(before[key], torch.Tensor) else before[key] == after[key]), key


def test_torch_writes_before_failing_where_sdtree_does_not():
    sd = sdtree.get_model_state_dict(make(seed=5)[0])
    sd["head.weight"] = torch.zeros(3, 3)
    model, _ = make()
    before = model.embed.weight.detach().clone()
    with pytest.raises(RuntimeError):
        dsd.set_model_state_dict(model, dict(sd))
    assert not torch.equal(model.embed.weight, before)  # torch wrote embed.weight, then failed
    model2, _ = make()
    with pytest.raises(RuntimeError):
        sdtree.set_model_state_dict(model2, dict(sd))
    assert torch.equal(model2.embed.weight, before)


def test_set_never_mutates_the_given_dict():
    model, _ = make()
    sd = sdtree.get_model_state_dict(make(seed=2)[0])
    keys, values = list(sd), list(sd.values())
    versions = [v._version for v in values if isinstance(v, torch.Tensor)]
    sdtree.set_model_state_dict(model, sd)
    assert list(sd) == keys and all(a is b for a, b in zip(sd.values(), values))
    assert versions == [v._version for v in sd.values() if isinstance(v, torch.Tensor)]
    with torch.no_grad():
        model.embed.weight.add_(1)
    assert not torch.equal(model.embed.weight, sd["embed.weight"])


def test_tied_weight_loads_from_either_fqn():
    model = Net(tied=True)
    sd = sdtree.get_model_state_dict(Net(tied=True))
    assert "head.weight" in sd and sd["head.weight"] is not None
    only_embed = {k: v for k, v in sd.items() if k != "head.weight"}
    result = sdtree.set_model_state_dict(model, only_embed)
    assert result.missing_keys == []
    assert model.head.weight is model.embed.weight and torch.equal(model.head.weight, sd["embed.weight"])


def test_deprecated_submodules_and_module_keyed_input_warn():
    model, _ = make()
    with pytest.warns(FutureWarning, match="Getting submodules only"):
        ours = sdtree.get_model_state_dict(model, submodules={model.blocks}, options=StateDictOptions(keep_submodule_prefixes=False))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = dsd.get_model_state_dict(model, submodules={model.blocks}, options=dsd.StateDictOptions(keep_submodule_prefixes=False))
    assert list(ours) == list(theirs) and "0.linear1.weight" in ours
    with pytest.warns(FutureWarning, match=r"Dict\[nn.Module, Dict\[str, Any\]\]"):
        sdtree.set_model_state_dict(model, {model.blocks: ours}, options=StateDictOptions(strict=False))


def test_ignore_frozen_params_reports_absent_frozen_params_as_missing_without_raising():
    model, _ = make(frozen=True)
    sd = sdtree.get_model_state_dict(model, options=StateDictOptions(ignore_frozen_params=True))
    frozen = ["blocks.0.linear1.weight", "blocks.0.linear1.bias"]
    assert not set(frozen) & set(sd)
    ours, _ = make(frozen=True, seed=1)
    result = sdtree.set_model_state_dict(ours, sd, options=StateDictOptions(ignore_frozen_params=True))
    theirs, _ = make(frozen=True, seed=1)
    torch_result = dsd.set_model_state_dict(
        theirs, dict(sd), options=dsd.StateDictOptions(ignore_frozen_params=True, strict=False)
    )
    assert result.missing_keys == torch_result.missing_keys == frozen
    assert result.unexpected_keys == []
    assert_state_dict_equal(ours.state_dict(), theirs.state_dict())
    # a missing trainable parameter still raises under strict
    partial = {k: v for k, v in sd.items() if k != "blocks.0.linear2.weight"}
    with pytest.raises(IncompatibleStateDictError, match=r"Missing key\(s\) in state_dict: 'blocks.0.linear2.weight'\."):
        sdtree.set_model_state_dict(ours, partial, options=StateDictOptions(ignore_frozen_params=True))


def test_empty_state_dict_is_an_error_under_strict():
    with pytest.raises(RuntimeError, match="model state_dict is empty"):
        sdtree.set_model_state_dict(Net(), {})
    assert sdtree.set_model_state_dict(Net(), {}, options=StateDictOptions(strict=False)).missing_keys == []


def test_patch_model_state_dict():
    model = torch.compile(Net(), backend="eager")
    sdtree.patch_model_state_dict(model)
    sd = model.state_dict()
    assert next(iter(sd)) == "embed.weight"
    fresh = torch.compile(Net(), backend="eager")
    sdtree.patch_model_state_dict(fresh)
    fresh.load_state_dict(sd)
    assert_state_dict_equal(fresh.state_dict(), sd)


def test_module_with_custom_state_dict_hooks_uses_state_dict():
    model = Net()
    model.blocks[0].register_state_dict_post_hook(lambda module, sd, prefix, local_metadata: sd.__setitem__(prefix + "note", torch.ones(1)))
    ours = sdtree.get_model_state_dict(model)
    assert "blocks.0.note" in ours  # torch's get raises AttributeError on such keys
    assert_state_dict_equal(ours, model.state_dict())


def test_load_hooks_run():
    model = Net()
    seen = []
    model.blocks[0].register_load_state_dict_post_hook(lambda module, keys: seen.append(module))
    sdtree.set_model_state_dict(model, sdtree.get_model_state_dict(Net()))
    assert seen == [model.blocks[0]]


def test_identical_training_after_round_trip():
    model, optim = make()
    train(model, optim, steps=2)
    msd, osd = sdtree.get_state_dict(model, optim)
    fresh, fresh_optim = make(seed=9)
    sdtree.set_state_dict(fresh, fresh_optim, model_state_dict=msd, optim_state_dict=osd)
    assert train(model, optim, steps=3, seed=10) == train(fresh, fresh_optim, steps=3, seed=10)
    assert_state_dict_equal(fresh.state_dict(), model.state_dict())


def test_meta_tensors_are_kept_by_get_and_materialised_by_set():
    source = Net()
    with torch.device("meta"):
        model = Net()
    sd = sdtree.get_model_state_dict(model)
    assert sd["head.weight"].is_meta  # as torch: get keeps meta tensors
    assert list(sd) == list(dsd.get_model_state_dict(model))
    sdtree.set_model_state_dict(model, sdtree.get_model_state_dict(source))
    assert not any(p.is_meta for p in model.parameters())
    assert isinstance(model.head.weight, nn.Parameter) and model.head.weight.requires_grad
    assert_state_dict_equal(model.state_dict(), source.state_dict())


@pytest.mark.parametrize("setup", SETUPS)
def test_broadcast_load_outside_a_process_group_writes_into_the_parameters(setup):
    model, optim = build(setup, seed=0)
    train(model, optim)
    sd = sdtree.get_model_state_dict(model)
    given = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in sd.items()}
    fresh, _ = build(setup, seed=1)
    storage = {name: p.data_ptr() for name, p in fresh.named_parameters()}
    opts = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
    result = sdtree.set_model_state_dict(fresh, sd, options=opts)
    assert result.missing_keys == [] and result.unexpected_keys == []
    assert_state_dict_equal(fresh.state_dict(), model.state_dict())
    assert {name: p.data_ptr() for name, p in fresh.named_parameters()} == storage
    with torch.no_grad():
        for p in fresh.parameters():
            p.add_(1.0)
    assert_state_dict_equal(sd, given)  # loaded by copy: the given tensors are not aliased


def test_broadcast_load_leaves_modules_with_load_pre_hooks_to_their_hooks():
    model = Net()
    seen = []

    def hook(module, state_dict, prefix, *args):
        seen.extend(sorted(k for k in state_dict if k.startswith(prefix)))

    model.blocks[0].linear1._register_load_state_dict_pre_hook(hook, with_module=True)
    source = sdtree.get_model_state_dict(Net())
    opts = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
    sdtree.set_model_state_dict(model, source, options=opts)
    assert seen == ["blocks.0.linear1.bias", "blocks.0.linear1.weight"]
    assert_state_dict_equal(sdtree.get_model_state_dict(model), source)


class _NoneExtraState(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(2, 2)
        self.loaded: list = []

    def get_extra_state(self):
        return None

    def set_extra_state(self, state) -> None:
        self.loaded.append(state)


BROADCAST = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)


def test_broadcast_load_sets_extra_state_even_when_it_is_none():
    model = _NoneExtraState()
    sdtree.set_model_state_dict(model, sdtree.get_model_state_dict(_NoneExtraState()), options=BROADCAST)
    assert model.loaded == [None]


def test_broadcast_load_of_a_view_of_the_parameter_itself_fails_like_a_plain_load():
    for opts in (StateDictOptions(), BROADCAST):
        model = nn.Linear(3, 3, bias=False)
        before = model.weight.detach().clone()
        with pytest.raises(RuntimeError, match="single memory location"):
            sdtree.set_model_state_dict(model, {"weight": model.weight.detach().t()}, options=opts)
        assert torch.equal(model.weight, before)


def test_broadcast_load_of_an_untied_checkpoint_into_a_tied_model_matches_a_plain_load():
    source = sdtree.get_model_state_dict(Net())
    assert not torch.equal(source["embed.weight"], source["head.weight"])
    plain, broadcast = Net(tied=True), Net(tied=True)
    sdtree.set_model_state_dict(plain, source)
    sdtree.set_model_state_dict(broadcast, source, options=BROADCAST)
    assert_state_dict_equal(broadcast.state_dict(), plain.state_dict())


def test_broadcast_load_keeps_an_instance_level_load_from_state_dict():
    model = Net()
    seen = []
    linear = model.blocks[0].linear1
    original = linear._load_from_state_dict

    def load(state_dict, prefix, *args):
        seen.extend(sorted(k for k in state_dict if k.startswith(prefix)))
        return original(state_dict, prefix, *args)

    linear._load_from_state_dict = load
    source = sdtree.get_model_state_dict(Net())
    sdtree.set_model_state_dict(model, source, options=BROADCAST)
    assert seen == ["blocks.0.linear1.bias", "blocks.0.linear1.weight"]
    assert_state_dict_equal(sdtree.get_model_state_dict(model), source)


def test_broadcast_load_into_a_model_made_in_inference_mode_fails_like_a_plain_load():
    source = sdtree.get_model_state_dict(nn.Linear(2, 2))
    for opts in (StateDictOptions(), BROADCAST):
        with torch.inference_mode():
            model = nn.Linear(2, 2)
        with pytest.raises(RuntimeError, match="[Ii]nference"):
            sdtree.set_model_state_dict(model, source, options=opts)
