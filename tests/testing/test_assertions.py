from collections import OrderedDict

import pytest
import torch

from sdtree.testing import assert_state_dict_equal


def test_equal_state_dicts_pass_regardless_of_order_and_mapping_type():
    a = {"x": torch.ones(2), "y": [1, (2.0, None)]}
    b = OrderedDict([("y", [1, (2.0, None)]), ("x", torch.ones(2))])
    assert_state_dict_equal(a, b)


def test_diff_lists_missing_unexpected_shape_dtype_and_values():
    actual = {"a": torch.ones(2, 2), "b": torch.ones(2), "c": torch.tensor([1.0, 2.0, 3.0]), "extra": 1}
    expected = {"a": torch.ones(2, 3), "b": torch.ones(2).double(), "c": torch.tensor([1.0, 5.0, 3.0]), "gone": 1}
    with pytest.raises(AssertionError) as info:
        assert_state_dict_equal(actual, expected)
    text = str(info.value)
    assert "state dicts differ (5 problem(s))" in text
    assert "missing (in expected, not in actual): sd['gone']" in text
    assert "unexpected (in actual, not in expected): sd['extra']" in text
    assert "sd['a']: shape (2, 2) vs (2, 3)" in text
    assert "sd['b']: dtype torch.float32 vs torch.float64" in text
    assert "sd['c']: values differ at index (1,): 2.0 vs 5.0 (1 of 3 element(s) differ)" in text


def test_tuple_is_not_list_and_int_is_not_float():
    with pytest.raises(AssertionError, match=r"sd\['b'\]\[0\]: containers \['dict', 'tuple'\] vs \['dict', 'list'\]"):
        assert_state_dict_equal({"b": (1,)}, {"b": [1]})
    with pytest.raises(AssertionError, match=r"type int \(1\) vs float \(1\.0\)"):
        assert_state_dict_equal({"b": 1}, {"b": 1.0})


def test_empty_containers_count():
    with pytest.raises(AssertionError, match="structure differs"):
        assert_state_dict_equal({"state": {}}, {"state": []})


def test_tolerances_and_nan():
    assert_state_dict_equal({"a": torch.tensor([1.0, float("nan")])}, {"a": torch.tensor([1.0, float("nan")])})
    assert_state_dict_equal({"a": torch.tensor([1.0])}, {"a": torch.tensor([1.001])}, atol=0.01)
    with pytest.raises(AssertionError, match="values differ"):
        assert_state_dict_equal({"a": torch.tensor([1.0])}, {"a": torch.tensor([1.001])})


def test_tensor_against_non_tensor_and_zero_dim():
    with pytest.raises(AssertionError, match=r"sd\['s'\]: type Tensor vs int"):
        assert_state_dict_equal({"s": torch.tensor(1)}, {"s": 1})
    with pytest.raises(AssertionError, match=r"values differ at index \(\): 1 vs 2"):
        assert_state_dict_equal({"s": torch.tensor(1)}, {"s": torch.tensor(2)})


def test_problem_list_is_capped():
    a = {str(i): i for i in range(20)}
    b = {str(i): i + 1 for i in range(20)}
    with pytest.raises(AssertionError, match=r"\.\.\. and 10 more"):
        assert_state_dict_equal(a, b)
