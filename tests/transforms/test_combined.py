import pytest
import torch

from sdtree.errors import LayoutMismatchError, NotAMappingError, PatternMatchError
from sdtree.testing import assert_state_dict_equal
from sdtree.transforms import add_prefix, at, each, fuse, strip_prefix

QK = fuse(["{m}.q", "{m}.k"], "{m}.qk", sizes=(2, 1))


def _checkpoint():
    model = {"a.q": torch.zeros(2, 3), "a.k": torch.ones(1, 3), "b": torch.ones(1)}
    state = {k: {"step": torch.tensor(2.0), "exp_avg": v + 1} for k, v in model.items()}
    optim = {"state": state, "param_groups": [{"params": list(model), "lr": 0.1}]}
    by_ids = {"state": {0: {"step": 1}}, "param_groups": [{"params": [0]}]}
    return {"model": model, "optim": optim, "optimizer": optim, "by_ids": by_ids, "scheduler": {"last_epoch": 3}, "step": 7}


def test_each_moves_every_fqn_keyed_optimizer_with_the_model():
    ckpt = _checkpoint()
    out = each(QK)(ckpt)
    assert list(out["model"]) == ["a.qk", "b"]
    for name in ("optim", "optimizer"):
        assert list(out[name]["state"]) == ["a.qk", "b"]
        assert torch.equal(out[name]["state"]["a.qk"]["exp_avg"], torch.cat([torch.ones(2, 3), torch.full((1, 3), 2.0)]))
        assert out[name]["param_groups"][0]["params"] == ["a.qk", "b"]
    for kept in ("by_ids", "scheduler", "step"):
        assert out[kept] is ckpt[kept]
    assert_state_dict_equal(each(QK).inverse()(out), ckpt)


def test_each_needs_a_combined_checkpoint():
    with pytest.raises(LayoutMismatchError, match=r"expected a combined checkpoint \{'model': model_state_dict, \.\.\.\}, found entries 'a.q'"):
        each(QK)({"a.q": torch.zeros(2, 3)})


def test_at_transforms_one_entry():
    ckpt = _checkpoint()
    out = at("scheduler", add_prefix("s."))(ckpt)
    assert out["scheduler"] == {"s.last_epoch": 3} and out["model"] is ckpt["model"]
    assert at("scheduler", add_prefix("s.")).inverse()(out)["scheduler"] == {"last_epoch": 3}
    with pytest.raises(LayoutMismatchError, match=r"there is no entry 'model2' to transform \(entries: 'model', 'optim'"):
        at("model2", add_prefix("s."))(ckpt)
    with pytest.raises(NotAMappingError):
        at("model", add_prefix("s."))([1])
    with pytest.raises(TypeError, match="must be a Transform"):
        at("model", lambda sd: sd)


def test_a_rule_on_a_combined_checkpoint_itself_says_to_use_each():
    with pytest.raises(PatternMatchError, match=r"nested state dicts \('model', 'optim', 'optimizer', 'by_ids', 'scheduler'\): a combined checkpoint\? .*each\(rule\)"):
        QK(_checkpoint())


def test_key_transforms_take_model_and_optimizer_pairs():
    ckpt = _checkpoint()
    model, optim = strip_prefix("a.", strict=False)((ckpt["model"], ckpt["optim"]))
    assert list(model) == ["q", "k", "b"] and optim["param_groups"][0]["params"] == ["q", "k", "b"]
