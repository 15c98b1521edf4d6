"""Law: no transform or utility mutates its input, and leaves it does not
change come back as the very same objects."""

import torch
from hypothesis import given
from hypothesis import strategies as st

import sdtree
from sdtree.errors import SdtreeError
from sdtree.transforms import (
    drop_meta_tensors,
    flatten_optimizer,
    fqns_to_param_ids,
    merge_optimizers,
    offload_to_cpu,
    optimizer_layout,
    param_ids_to_fqns,
    split_optimizer,
    to_device,
    unflatten_optimizer,
)

from .snapshot import assert_unchanged, snapshot
from .strategies import fqn_optimizer_state_dicts, key_transforms, optimizer_state_dicts, state_dicts

TENSOR_TRANSFORMS = st.sampled_from(
    [offload_to_cpu(), offload_to_cpu(share_memory=True), offload_to_cpu(share_memory=True, bulk=False), to_device("cpu"), drop_meta_tensors()]
)


def _apply(t, x):
    try:
        return t(x)
    except SdtreeError:
        return None


@given(state_dicts(), st.one_of(key_transforms, TENSOR_TRANSFORMS))
def test_transforms_leave_model_state_dict_untouched(sd, t):
    before = snapshot(sd)
    _apply(t, sd)
    assert_unchanged(before, sd)


@given(fqn_optimizer_state_dicts(), st.one_of(key_transforms, TENSOR_TRANSFORMS, st.just(flatten_optimizer())))
def test_transforms_leave_optimizer_state_dict_untouched(osd, t):
    before = snapshot(osd)
    _apply(t, osd)
    assert_unchanged(before, osd)


@given(optimizer_state_dicts(keys="int"))
def test_optimizer_rekeying_and_layouts_leave_input_untouched(osd):
    before = snapshot(osd)
    ids = [k for g in osd["param_groups"] for k in g["params"]]
    named = param_ids_to_fqns({i: f"p{i}" for i in ids})(osd)
    flat = flatten_optimizer()(named)
    flat_before = snapshot(flat)
    unflatten_optimizer(optimizer_layout(named))(flat)
    assert_unchanged(flat_before, flat)
    fqns_to_param_ids({f"p{i}": i for i in ids})(named)
    split_optimizer([optimizer_layout(osd)])(merge_optimizers()([osd]))
    assert_unchanged(before, osd)


@given(state_dicts())
def test_utilities_leave_input_untouched(sd):
    before = snapshot(sd)
    sdtree.offload_state_dict_to_cpu(sd, type_check=False)
    cpu = sdtree.create_cpu_state_dict(sd)
    sdtree.copy_state_dict(sd, cpu, type_check=False)
    sdtree.check_state_dict_similarity(sd, cpu)
    try:
        flat, mapping = sdtree.flatten_state_dict(sd)
        sdtree.unflatten_state_dict(flat, mapping)
    except SdtreeError:
        pass
    assert_unchanged(before, sd)


@given(state_dicts(), key_transforms)
def test_key_transforms_share_every_leaf(sd, t):
    out = _apply(t, sd)
    if out is None:
        return
    originals = {id(v) for v in sd.values()}
    assert all(id(v) in originals for v in out.values())
    assert out is not sd


@given(state_dicts())
def test_offload_shares_cpu_leaves_and_copies_nothing(sd):
    out = offload_to_cpu()(sd)
    assert list(out) == list(sd)
    for key, value in sd.items():
        if isinstance(value, torch.Tensor) or not isinstance(value, (list, tuple, dict)):
            assert out[key] is value
