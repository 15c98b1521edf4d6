import attrs
import pytest
from torch.distributed.checkpoint.state_dict import StateDictOptions as TorchOptions

from sdtree import StateDictOptions
from sdtree.options import as_options


def test_fields_and_defaults_equal_torchs():
    ours = {f.name: f.default for f in attrs.fields(StateDictOptions)}
    theirs = {name: getattr(TorchOptions(), name) for name in TorchOptions.__dataclass_fields__}
    assert ours == theirs


def test_broadcast_from_rank0_needs_full_state_dict():
    with pytest.raises(ValueError, match="broadcast_from_rank0=True needs full_state_dict=True"):
        StateDictOptions(broadcast_from_rank0=True)
    assert StateDictOptions(full_state_dict=True, broadcast_from_rank0=True).broadcast_from_rank0


def test_frozen_keyword_only_and_validated():
    options = StateDictOptions()
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        options.strict = False
    with pytest.raises(TypeError):
        StateDictOptions(True)
    with pytest.raises(TypeError, match="strict"):
        StateDictOptions(strict="yes")
    assert attrs.evolve(options, strict=False).strict is False


def test_torch_options_are_accepted():
    assert as_options(TorchOptions(cpu_offload=True, strict=False)) == StateDictOptions(cpu_offload=True, strict=False)
    assert as_options(None) == StateDictOptions()
    with pytest.raises(TypeError, match="options must be a StateDictOptions"):
        as_options({"strict": False})
