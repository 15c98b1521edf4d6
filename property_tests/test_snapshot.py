"""The purity snapshot catches every way a function can touch its input
(each law below is broken on purpose once)."""

import pytest
import torch

from .snapshot import assert_unchanged, snapshot


def _tree():
    return {
        "state": {"w": {"exp_avg": torch.ones(2), "step": 3}},
        "param_groups": [{"params": ["w"], "lr": 0.1, "betas": (0.9, 0.99)}],
        "meta": torch.empty(2, device="meta"),
    }


def _replace_nested_dict_by_an_equal_copy(tree):
    tree["state"]["w"] = dict(tree["state"]["w"])


def _reorder_nested_keys(tree):
    group = tree["param_groups"][0]
    group["params"] = group.pop("params")


def _replace_a_list_by_an_equal_list(tree):
    tree["param_groups"] = list(tree["param_groups"])


def _write_into_a_tensor(tree):
    tree["state"]["w"]["exp_avg"].mul_(1)


def _replace_a_leaf_by_an_equal_one(tree):
    tree["state"]["w"]["exp_avg"] = tree["state"]["w"]["exp_avg"].clone()


def _replace_a_meta_tensor(tree):
    tree["meta"] = torch.empty(2, device="meta")


def _add_a_key(tree):
    tree["state"]["w"]["extra"] = None


@pytest.mark.parametrize(
    "touch",
    [
        _replace_nested_dict_by_an_equal_copy,
        _reorder_nested_keys,
        _replace_a_list_by_an_equal_list,
        _write_into_a_tensor,
        _replace_a_leaf_by_an_equal_one,
        _replace_a_meta_tensor,
        _add_a_key,
    ],
)
def test_assert_unchanged_catches(touch):
    tree = _tree()
    before = snapshot(tree)
    assert_unchanged(before, tree)  # untouched: passes
    touch(tree)
    with pytest.raises(AssertionError):
        assert_unchanged(before, tree)
