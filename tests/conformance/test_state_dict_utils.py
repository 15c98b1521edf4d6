"""PyTorch's test_state_dict_utils.py, behaviour by behaviour, against sdtree (2 gloo workers)."""

import pytest

from tests.conformance import bodies_state_dict_utils as bodies
from tests.distributed import bodies_utils


@pytest.mark.parametrize(
    "body",
    [
        bodies.gather_dtensor_to_the_full_tensor,
        bodies.gather_and_offload_on_some_ranks_only,
        bodies.gather_a_nested_dict_with_lists,
        bodies.create_and_copy_cpu_state_dicts,
        bodies.cpu_copy_of_a_dtensor_follows_its_source,
        bodies_utils.distribute_tensors_matches_torch,  # test_state_dict_util_distribute_tensors
    ],
    ids=lambda body: body.__name__,
)
def test_state_dict_utils_behaviour(body, pool2):
    assert pool2.run(body) == ["ok", "ok"]
