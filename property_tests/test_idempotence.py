"""Law: applying these transforms twice equals applying them once."""

from hypothesis import given
from hypothesis import strategies as st

from sdtree.testing import assert_state_dict_equal
from sdtree.transforms import drop_keys, drop_meta_tensors, offload_to_cpu, select_keys

from .strategies import fqn_optimizer_state_dicts, state_dicts

IDEMPOTENT = st.sampled_from(
    [
        select_keys("module."),
        select_keys(where=lambda k: "a" in k),
        drop_keys("layers."),
        drop_meta_tensors(),
        offload_to_cpu(),
        offload_to_cpu(share_memory=True),
    ]
)


@given(st.one_of(state_dicts(), fqn_optimizer_state_dicts()), IDEMPOTENT)
def test_idempotent_transforms(sd, t):
    once = t(sd)
    twice = t(once)
    assert_state_dict_equal(twice, once)


@given(state_dicts(tensors_only=True))
def test_offload_twice_returns_the_same_tensors(sd):
    once = offload_to_cpu(share_memory=True)(sd)
    twice = offload_to_cpu(share_memory=True)(once)
    assert all(twice[k] is once[k] for k in once)
