import pytest
import torch
from torch.distributed import _state_dict_utils as torch_utils

import sdtree
from sdtree.errors import KeyCollisionError, LayoutMismatchError
from sdtree.testing import assert_state_dict_equal
from tests.corpus import int_keyed_optimizer_state_dict

NESTED = [
    {},
    {"a": 1},
    {"model": {"w": torch.ones(2), "b": None}, "optim": int_keyed_optimizer_state_dict()},
    {"l": [1, [2, {"x": 3}], (4, 5)], "e": {}},
    {"gaps": {0: "int key", "s": [None, 2]}},
]


@pytest.mark.parametrize("sd", NESTED)
def test_flatten_state_dict_matches_torch(sd):
    flat, mapping = sdtree.flatten_state_dict(sd)
    t_flat, t_mapping = torch_utils._flatten_state_dict(sd)
    assert list(flat) == list(t_flat)
    assert mapping == t_mapping
    assert_state_dict_equal(flat, t_flat)
    assert_state_dict_equal(
        sdtree.unflatten_state_dict(flat, mapping), torch_utils._unflatten_state_dict(t_flat, t_mapping)
    )


def test_flatten_state_dict_collision_names_both_paths():
    with pytest.raises(KeyCollisionError, match=r"paths \('a\.b',\) and \('a', 'b'\) both flatten to key 'a\.b'"):
        sdtree.flatten_state_dict({"a.b": 1, "a": {"b": 2}})


def test_unflatten_state_dict_names_unknown_keys():
    with pytest.raises(LayoutMismatchError, match=r"1 key\(s\) have no path in the mapping: 'zz'"):
        sdtree.unflatten_state_dict({"zz": 1}, {})
