import dataclasses
import inspect

import pytest
import torch
import torch.distributed.checkpoint.state_dict as torch_dsd
from torch.distributed.checkpoint.state_dict import StateDictOptions as TorchOptions

import sdtree
from sdtree import StateDictOptions
from sdtree.options import as_options


def test_fields_and_defaults_equal_torchs():
    init = inspect.signature(StateDictOptions).parameters
    ours = {name: p.default for name, p in init.items()}
    theirs = {f.name: f.default for f in dataclasses.fields(TorchOptions)}
    assert ours == theirs
    assert [f.name for f in dataclasses.fields(StateDictOptions)] == list(theirs)


def test_broadcast_from_rank0_needs_full_state_dict():
    with pytest.raises(ValueError, match="broadcast_from_rank0=True needs full_state_dict=True"):
        StateDictOptions(broadcast_from_rank0=True)
    assert StateDictOptions(full_state_dict=True, broadcast_from_rank0=True).broadcast_from_rank0


def test_frozen_keyword_only_and_validated():
    options = StateDictOptions()
    with pytest.raises(dataclasses.FrozenInstanceError, match=r"cannot assign strict=False.*dataclasses.replace"):
        options.strict = False
    with pytest.raises(dataclasses.FrozenInstanceError):
        del options.strict
    with pytest.raises(TypeError):
        StateDictOptions(True)
    with pytest.raises(TypeError, match="strict must be a bool, got strict='yes'"):
        StateDictOptions(strict="yes")
    with pytest.raises(TypeError, match="dsd_fqn_modifiers must be a str"):
        StateDictOptions(dsd_fqn_modifiers=None)
    assert dataclasses.replace(options, strict=False).strict is False
    assert options.strict is True
    assert hash(options) == hash(StateDictOptions()) and options == StateDictOptions()


def test_is_a_dataclass_instance_of_torchs_class():
    options = StateDictOptions(cpu_offload=True)
    assert isinstance(options, TorchOptions) and dataclasses.is_dataclass(options)
    assert dataclasses.asdict(options) == dataclasses.asdict(TorchOptions(cpu_offload=True))


def test_torch_options_are_accepted():
    assert as_options(TorchOptions(cpu_offload=True, strict=False)) == StateDictOptions(cpu_offload=True, strict=False)
    assert as_options(None) == StateDictOptions()
    with pytest.raises(TypeError, match="options must be a StateDictOptions"):
        as_options({"strict": False})


def _trained():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    optim = torch.optim.Adam(model.parameters(), lr=0.1)
    model(torch.randn(5, 3)).sum().backward()
    optim.step()
    return model, optim


def test_torchs_six_functions_take_sdtree_options():
    """Code that still calls torch's functions (torch's own test helpers do)
    can be handed sdtree's options."""
    options = StateDictOptions(strict=False, flatten_optimizer_state_dict=True)
    model, optim = _trained()
    msd = torch_dsd.get_model_state_dict(model, options=options)
    osd = torch_dsd.get_optimizer_state_dict(model, optim, options=options)
    both = torch_dsd.get_state_dict(model, optim, options=options)
    assert list(msd) == ["0.weight", "0.bias", "2.weight", "2.bias"]
    assert "state.0.weight.exp_avg" in osd  # the flat form: the option took effect
    assert list(both[0]) == list(msd) and list(both[1]) == list(osd)
    assert sdtree.get_optimizer_state_dict(model, optim, options=options).keys() == osd.keys()

    other, other_optim = _trained()
    with torch.no_grad():
        for p in other.parameters():
            p.zero_()
    incompatible = torch_dsd.set_model_state_dict(other, {"0.weight": msd["0.weight"]}, options=options)
    assert "0.bias" in incompatible.missing_keys  # strict=False took effect: no raise
    torch_dsd.set_optimizer_state_dict(other, other_optim, osd, options=options)
    torch_dsd.set_state_dict(other, other_optim, model_state_dict=msd, optim_state_dict=osd, options=options)
    for a, b in zip(model.parameters(), other.parameters()):
        assert torch.equal(a, b)
    assert torch.equal(other_optim.state_dict()["state"][0]["exp_avg"], optim.state_dict()["state"][0]["exp_avg"])
