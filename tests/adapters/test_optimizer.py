import pytest
import torch
from torch.distributed.checkpoint import state_dict as dsd

import sdtree
from sdtree import StateDictOptions
from sdtree.errors import IncompatibleStateDictError, MissingParamIdError
from sdtree.testing import assert_state_dict_equal
from tests.adapters.models import Net, clone_setup, make, snapshot_module, snapshot_optim, train
from tests.adapters.setups import SETUPS, build

OPTIONS = {
    "default": {},
    "flatten": {"flatten_optimizer_state_dict": True},
    "cpu_offload": {"cpu_offload": True},
    "full_cpu": {"full_state_dict": True, "cpu_offload": True},
}


@pytest.mark.parametrize("setup", SETUPS)
@pytest.mark.parametrize("opts", sorted(OPTIONS))
def test_get_optimizer_state_dict_matches_torch(setup, opts):
    model, optim = build(setup)
    train(model, optim)
    ours = sdtree.get_optimizer_state_dict(model, optim, options=StateDictOptions(**OPTIONS[opts]))
    theirs = dsd.get_optimizer_state_dict(model, optim, options=dsd.StateDictOptions(**OPTIONS[opts]))
    if setup == "ac_of_compile":  # torch keeps '_orig_mod.' there (see test_module)
        theirs = sdtree.transforms.rename([(r"_orig_mod\.", "")])(theirs)
    assert_state_dict_equal(ours, theirs)


@pytest.mark.parametrize("setup", ["plain", "groups", "sgd", "frozen", "tied"])
def test_fresh_optimizer_reports_torch_initial_state_without_changing_anything(setup):
    model, optim = build(setup)
    twin_model, twin_optim = clone_setup(model, optim)
    model_before, optim_before = snapshot_module(model), snapshot_optim(optim)
    ours = sdtree.get_optimizer_state_dict(model, optim)
    theirs = dsd.get_optimizer_state_dict(twin_model, twin_optim)
    assert_state_dict_equal(ours, theirs)
    if setup != "sgd":
        assert len(ours["state"]) > 0
    assert_state_dict_equal(snapshot_optim(optim), optim_before)
    model_after = snapshot_module(model)
    for key, value in model_before.items():
        assert (torch.equal(value, model_after[key]) if isinstance(value, torch.Tensor) else value == model_after[key]), key


def test_torch_get_steps_the_optimizer_where_sdtree_does_not():
    model, optim = make()
    sdtree.get_optimizer_state_dict(model, optim)
    assert len(optim.state) == 0 and all(p.grad is None for p in model.parameters())
    dsd.get_optimizer_state_dict(model, optim)
    assert len(optim.state) > 0  # torch initialised the optimizer's state behind our back


def test_optimizer_with_grads_but_no_state_reports_empty_state_like_torch():
    model, optim = make(optim="sgd")
    train(model, [], steps=1)  # grads, no step
    grads = [p.grad.clone() for p in model.parameters()]
    ours = sdtree.get_optimizer_state_dict(model, optim)
    assert ours["state"] == {}
    assert all(torch.equal(g, p.grad) for g, p in zip(grads, model.parameters()))


@pytest.mark.parametrize("setup", SETUPS)
def test_round_trip_restores_optimizer_exactly(setup):
    model, optim = build(setup)
    train(model, optim)
    osd = sdtree.get_optimizer_state_dict(model, optim)
    fresh_model, fresh_optim = build(setup, seed=1)
    sdtree.set_optimizer_state_dict(fresh_model, fresh_optim, osd)
    assert_state_dict_equal(snapshot_optim(fresh_optim), snapshot_optim(optim))


def test_flattened_round_trip_and_torch_loads_ours():
    model, optim = make(groups=True)
    train(model, optim)
    opts = StateDictOptions(flatten_optimizer_state_dict=True)
    flat = sdtree.get_optimizer_state_dict(model, optim, options=opts)
    assert "param_groups.embed.weight.lr" in flat and "state.embed.weight.exp_avg" in flat
    fresh_model, fresh_optim = make(seed=1, groups=True)
    sdtree.set_optimizer_state_dict(fresh_model, fresh_optim, flat, options=opts)
    assert_state_dict_equal(snapshot_optim(fresh_optim), snapshot_optim(optim))


def test_set_matches_torch_set():
    model, optim = make(groups=True)
    train(model, optim)
    osd = sdtree.get_optimizer_state_dict(model, optim)
    ours_model, ours_optim = make(seed=1, groups=True)
    theirs_model, theirs_optim = make(seed=1, groups=True)
    sdtree.set_optimizer_state_dict(ours_model, ours_optim, osd)
    dsd.set_optimizer_state_dict(theirs_model, theirs_optim, osd)
    assert_state_dict_equal(snapshot_optim(ours_optim), snapshot_optim(theirs_optim))


def test_two_optimizers_merge_and_split_back():
    model, _ = make()
    embed = torch.optim.Adam(model.embed.parameters(), lr=0.1)
    rest = torch.optim.SGD([p for n, p in model.named_parameters() if not n.startswith("embed")], lr=0.2, momentum=0.9)
    train(model, [embed, rest])
    ours = sdtree.get_optimizer_state_dict(model, [embed, rest])
    theirs = dsd.get_optimizer_state_dict(model, [embed, rest])
    assert_state_dict_equal(ours, theirs)
    assert [g["lr"] for g in ours["param_groups"]] == [0.1, 0.2]
    fresh, _ = make(seed=1)
    embed2 = torch.optim.Adam(fresh.embed.parameters(), lr=0.5)
    rest2 = torch.optim.SGD([p for n, p in fresh.named_parameters() if not n.startswith("embed")], lr=0.5, momentum=0.9)
    sdtree.set_optimizer_state_dict(fresh, [embed2, rest2], ours)
    assert_state_dict_equal(snapshot_optim(embed2), snapshot_optim(embed))
    assert_state_dict_equal(snapshot_optim(rest2), snapshot_optim(rest))


def test_lr_scheduler_initial_lr_is_saved_and_restored():
    model, optim = make()
    scheduler = torch.optim.lr_scheduler.StepLR(optim, step_size=1, gamma=0.5)
    train(model, optim)
    scheduler.step()
    osd = sdtree.get_optimizer_state_dict(model, optim)
    assert osd["param_groups"][0]["initial_lr"] == 1e-2
    assert_state_dict_equal(osd, dsd.get_optimizer_state_dict(model, optim))
    fresh, fresh_optim = make(seed=1)
    assert "initial_lr" not in fresh_optim.param_groups[0]
    sdtree.set_optimizer_state_dict(fresh, fresh_optim, osd)
    assert fresh_optim.param_groups[0]["initial_lr"] == 1e-2
    assert fresh_optim.param_groups[0]["lr"] == optim.param_groups[0]["lr"]


def test_param_names_name_the_parameters():
    model = Net()
    optim = torch.optim.Adam(model.named_parameters(), lr=0.1)
    train(model, optim)
    osd = sdtree.get_optimizer_state_dict(model, optim)
    assert osd["param_groups"][0]["params"] == [n for n, _ in model.named_parameters()]
    assert osd["param_groups"][0]["param_names"] == osd["param_groups"][0]["params"]
    compiled = torch.compile(model, backend="eager")
    optim2 = torch.optim.Adam(compiled.named_parameters(), lr=0.1)
    osd2 = sdtree.get_optimizer_state_dict(compiled, optim2)
    assert osd2["param_groups"][0]["params"][0] == "embed.weight"


def test_optimizer_over_foreign_parameter_is_a_clear_error():
    model = Net()
    optim = torch.optim.SGD([torch.nn.Parameter(torch.ones(2, 2))], lr=0.1)
    with pytest.raises(MissingParamIdError, match=r"1 parameter\(s\) of the optimizer are not parameters of the model: param_groups\[0\]\['params'\]\[0\] \(shape \(2, 2\)\)"):
        sdtree.get_optimizer_state_dict(model, optim)


def test_set_validates_everything_before_writing():
    model, _ = make()
    embed = torch.optim.Adam(model.embed.parameters(), lr=0.1)
    rest = torch.optim.Adam([p for n, p in model.named_parameters() if not n.startswith("embed")], lr=0.1)
    train(model, [embed, rest])
    osd = sdtree.get_optimizer_state_dict(model, [embed, rest])
    bad = {"state": dict(osd["state"]), "param_groups": osd["param_groups"]}
    bad["state"]["head.weight"] = {**bad["state"]["head.weight"], "exp_avg": torch.zeros(2, 2)}
    fresh, _ = make(seed=1)
    embed2 = torch.optim.Adam(fresh.embed.parameters(), lr=0.5)
    rest2 = torch.optim.Adam([p for n, p in fresh.named_parameters() if not n.startswith("embed")], lr=0.5)
    train(fresh, [embed2, rest2], steps=1)
    before = [snapshot_optim(embed2), snapshot_optim(rest2)]
    with pytest.raises(IncompatibleStateDictError, match=r"state of 'head.weight': 'exp_avg': expected shape \(16, 8\), found \(2, 2\).*Nothing was written"):
        sdtree.set_optimizer_state_dict(fresh, [embed2, rest2], bad)
    assert_state_dict_equal(snapshot_optim(embed2), before[0])
    assert_state_dict_equal(snapshot_optim(rest2), before[1])


def test_strict_missing_and_unexpected_optimizer_keys():
    model, optim = make()
    train(model, optim)
    osd = sdtree.get_optimizer_state_dict(model, optim)
    missing = {"state": {k: v for k, v in osd["state"].items() if k != "head.weight"}, "param_groups": osd["param_groups"]}
    fresh, fresh_optim = make(seed=1)
    with pytest.raises(RuntimeError, match=r"Missing key\(s\).*'head.weight'"):
        sdtree.set_optimizer_state_dict(fresh, fresh_optim, missing)
    sdtree.set_optimizer_state_dict(fresh, fresh_optim, missing, options=StateDictOptions(strict=False))
    assert len(fresh_optim.state) == len(osd["state"]) - 1
    extra = {"state": {**osd["state"], "ghost.weight": {"step": 1}}, "param_groups": osd["param_groups"]}
    with pytest.raises(RuntimeError, match=r"Unexpected key\(s\).*'ghost.weight'"):
        sdtree.set_optimizer_state_dict(fresh, fresh_optim, extra)


def test_set_never_mutates_or_aliases_the_given_dict():
    model, optim = make()
    train(model, optim)
    osd = sdtree.get_optimizer_state_dict(model, optim)
    saved = {k: {n: v.clone() if isinstance(v, torch.Tensor) else v for n, v in e.items()} for k, e in osd["state"].items()}
    groups = [dict(g) for g in osd["param_groups"]]
    fresh, fresh_optim = make(seed=1)
    sdtree.set_optimizer_state_dict(fresh, fresh_optim, osd)
    train(fresh, fresh_optim, steps=2)
    assert_state_dict_equal(osd["state"], saved)
    assert osd["param_groups"] == groups


def test_int_keyed_state_dict_loads_positionally_like_torch():
    model, optim = make()
    train(model, optim)
    fresh, fresh_optim = make(seed=1)
    sdtree.set_optimizer_state_dict(fresh, fresh_optim, optim.state_dict())
    assert_state_dict_equal(snapshot_optim(fresh_optim), snapshot_optim(optim))


def test_patch_optimizer_state_dict():
    model, optim = make()
    train(model, optim)
    sdtree.patch_optimizer_state_dict(model, optimizers=(optim,))
    osd = optim.state_dict()
    assert "embed.weight" in osd["state"]
    fresh, fresh_optim = make(seed=1)
    sdtree.patch_optimizer_state_dict(fresh, optimizers=(fresh_optim,))
    fresh_optim.load_state_dict(osd)
    assert_state_dict_equal(fresh_optim.state_dict(), osd)


def test_param_names_name_parameters_the_model_does_not_hold():
    model = Net()
    temperature = torch.nn.Parameter(torch.ones(()))
    optim = torch.optim.Adam(list(model.named_parameters()) + [("temperature", temperature)], lr=0.1)
    temperature.grad = torch.ones(())
    train(model, optim)
    osd = sdtree.get_optimizer_state_dict(model, optim)
    assert osd["param_groups"][0]["params"][-1] == "temperature"
    assert "temperature" in osd["state"]
    with pytest.raises(KeyError):
        dsd.get_optimizer_state_dict(model, optim)  # torch cannot name it
    fresh = Net()
    fresh_temperature = torch.nn.Parameter(torch.zeros(()))
    fresh_optim = torch.optim.Adam(list(fresh.named_parameters()) + [("temperature", fresh_temperature)], lr=0.5)
    sdtree.set_optimizer_state_dict(fresh, fresh_optim, osd)
    assert_state_dict_equal(snapshot_optim(fresh_optim), snapshot_optim(optim))


def test_torch_set_aliases_the_given_tensors_where_sdtree_copies():
    model, optim = make()
    train(model, optim)
    osd = sdtree.get_optimizer_state_dict(model, optim)
    saved = osd["state"]["embed.weight"]["exp_avg"].clone()
    fresh, fresh_optim = make(seed=1)
    dsd.set_optimizer_state_dict(fresh, fresh_optim, osd)
    train(fresh, fresh_optim, steps=1)
    assert not torch.equal(osd["state"]["embed.weight"]["exp_avg"], saved)  # torch's training wrote into our dict


def test_set_state_dict_checks_both_before_writing_either():
    model, optim = make()
    train(model, optim)
    msd, osd = sdtree.get_state_dict(model, optim)
    bad_osd = {"state": {**osd["state"], "embed.weight": {**osd["state"]["embed.weight"], "exp_avg": torch.zeros(1, 1)}}, "param_groups": osd["param_groups"]}
    fresh, fresh_optim = make(seed=1)
    train(fresh, fresh_optim, steps=1)
    model_before, optim_before = snapshot_module(fresh), snapshot_optim(fresh_optim)
    with pytest.raises(IncompatibleStateDictError, match="'exp_avg': expected shape"):
        sdtree.set_state_dict(fresh, fresh_optim, model_state_dict=msd, optim_state_dict=bad_osd)
    after = snapshot_module(fresh)
    assert all(torch.equal(v, after[k]) if isinstance(v, torch.Tensor) else v == after[k] for k, v in model_before.items())
    assert_state_dict_equal(snapshot_optim(fresh_optim), optim_before)
    result = sdtree.set_state_dict(fresh, fresh_optim, model_state_dict=msd, optim_state_dict=osd)
    assert result.missing_keys == [] and result.unexpected_keys == []


def test_bad_state_leaf_is_rejected():
    model, optim = make()
    train(model, optim)
    osd = sdtree.get_optimizer_state_dict(model, optim)
    bad = {"state": {**osd["state"], "head.weight": {**osd["state"]["head.weight"], "note": object()}}, "param_groups": osd["param_groups"]}
    with pytest.raises(IncompatibleStateDictError, match=r"state of 'head.weight': 'note': unsupported value of type object"):
        sdtree.set_optimizer_state_dict(model, optim, bad)


def test_param_group_layout_is_validated():
    model, optim = make(groups=True)
    train(model, optim)
    osd = sdtree.get_optimizer_state_dict(model, optim)
    first, second, empty = osd["param_groups"]
    moved = first["params"][-1]
    regrouped = {
        "state": osd["state"],
        "param_groups": [{**first, "params": first["params"][:-1]}, {**second, "params": second["params"] + [moved]}, empty],
    }
    before = snapshot_optim(optim)
    with pytest.raises(
        IncompatibleStateDictError,
        match=r"parameters of param group 0 come from loaded param groups \[0, 1\], whose hyper-parameters differ "
        r"\('weight_decay': 0.1 in group 0, 0 in group 1\); a group must be loaded from groups that agree\. Nothing was written\. ",
    ):
        sdtree.set_optimizer_state_dict(model, optim, regrouped)
    assert_state_dict_equal(snapshot_optim(optim), before)


def test_one_group_loads_from_several_groups_that_agree():
    """As torch does for the per-parameter optimizers of _apply_optimizer_in_backward:
    their merged state dict (one group each) loads into one optimizer."""
    model, _ = make()
    params = list(model.parameters())
    halves = [torch.optim.Adam(params[:3], lr=1e-2), torch.optim.Adam(params[3:], lr=1e-2)]
    train(model, halves)
    merged = sdtree.get_optimizer_state_dict(model, halves)
    assert len(merged["param_groups"]) == 2
    whole = torch.optim.Adam(model.parameters(), lr=1e-2)
    sdtree.set_optimizer_state_dict(model, whole, merged)
    loaded = sdtree.get_optimizer_state_dict(model, whole)
    assert_state_dict_equal(loaded["state"], merged["state"])
    assert loaded["param_groups"][0]["params"] == [p for g in merged["param_groups"] for p in g["params"]]
