"""Conformance with PyTorch's test/distributed/checkpoint/test_state_dict.py.

One test per test of torch's file (its name in each docstring), each running
on CPU/gloo what torch's test checks, with sdtree's functions in place of
torch's and torch's own verification helpers calling back into sdtree (see
``bodies``). Set ``SDTREE_CONFORMANCE_API=torch`` to run the very same bodies
against torch's functions: that is how the claim "torch passes this on CPU"
is checked.

Left out of torch's subtests: ``use_composable=True`` of test_fsdp (torch's
composable FSDP1 ``fully_shard(policy=...)`` no longer exists); and the
FSDP1 variants of test_apply_optimizer_in_backward, which fail in torch
itself (the test is disabled there, as is test_use_dtensor).
"""

import itertools
import os

import pytest

from tests.conformance import bodies

API = os.environ.get("SDTREE_CONFORMANCE_API", "sdtree")


def _inline(fn, *args):
    """Run a single-process body here, without a process group."""
    return fn(0, 1, *args, API)


def _fsdp1_cases():
    """torch's product of use_orig_params x use_dtensor x wrapping x optimizer,
    halved: the optimizer follows the parity of the rest, so that every pair
    of choices still meets."""
    for orig, dtensor, wrapping in itertools.product([True, False], [True, False], [(), ("Linear", "UnitModule")]):
        optimizer = ["adam", "adamw"][(orig + dtensor + bool(wrapping)) % 2]
        yield {"use_orig_params": orig, "use_dtensor": dtensor, "wrapping": wrapping, "optimizer": optimizer}


def test_fsdp1_save_load_every_way_of_wrapping(pool2):
    """test_fsdp: FSDP1, flat or original parameters, ShardedTensor or DTensor
    (device mesh) state dicts, two auto-wrap policies, Adam and AdamW."""
    cases = list(_fsdp1_cases())
    assert len(pool2.run(bodies.save_load, "fsdp1", cases, API)[0]) == 8


def test_compiled_fsdp1_save_load(pool2):
    """test_compiled_fsdp: torch.compile around FSDP1 (use_orig_params)."""
    cases = [{"use_orig_params": True, "compile_model": True, "optimizer": o} for o in ("adam", "adamw")]
    assert len(pool2.run(bodies.save_load, "fsdp1", cases, API)[0]) == 2


def test_fsdp2_save_load_resharded_or_not_compiled_or_not(pool2):
    """test_fsdp2: fully_shard with reshard_after_forward either way, eager
    and compiled, Adam and AdamW (foreach)."""
    cases = [
        {"reshard_after_forward": r, "optimizer": o, "compile_model": c, "foreach": True}
        for r, o, c in itertools.product([True, False], ["adam", "adamw"], [True, False])
    ]
    assert len(pool2.run(bodies.save_load, "fsdp2", cases, API)[0]) == 8


def test_ddp_and_replicate_save_load(pool2):
    """test_ddp: DistributedDataParallel and composable replicate."""
    cases = [{"use_composable": c, "optimizer": o} for c, o in itertools.product([True, False], ["adam", "adamw"])]
    assert len(pool2.run(bodies.save_load, "ddp", cases, API)[0]) == 4


def test_fsdp_with_a_ddp_submodule_save_load(pool2):
    """test_fsdp_ddp: a DDP-replicated submodule inside FSDP1, and (composable)
    a replicated submodule left out of fully_shard."""
    cases = [{"use_composable": c, "optimizer": o} for c, o in itertools.product([True, False], ["adam", "adamw"])]
    assert len(pool2.run(bodies.save_load, "fsdp_ddp", cases, API)[0]) == 4


def test_frozen_parameters_are_left_out_by_ignore_frozen_params(pool2):
    """test_frozen_parameters: with two frozen submodules, ignore_frozen_params
    drops their parameters and the rest verifies against the unsharded model."""
    cases = [{"use_composable": True, "optimizer": o, "frozen": True, "test_frozen": True} for o in ("adam", "adamw")]
    assert len(pool2.run(bodies.save_load, "fsdp_ddp", cases, API)[0]) == 2


def test_fsdp1_on_a_device_mesh_with_a_ddp_submodule_save_load(pool2):
    """test_use_dtensor (disabled in torch, and calling _test_fsdp_ddp with an
    argument it lacks): test_fsdp_ddp's model with FSDP1 on a device mesh."""
    cases = [{"use_composable": False, "use_dtensor": True, "optimizer": "adam"}]
    assert len(pool2.run(bodies.save_load, "fsdp_ddp", cases, API)[0]) == 1


def test_optimizers_applied_in_backward_save_load(pool2):
    """test_apply_optimizer_in_backward (disabled in torch: its FSDP1 and
    replicate variants fail in torch): one optimizer per parameter, stepped
    in backward, under fully_shard, and the unsharded model; their state
    loads into one optimizer too (torch's _verify_osd_by_load)."""
    for setup, case in [("fsdp2", {"reshard_after_forward": True}), ("single", {"optimizer": "adamw"})]:
        assert len(pool2.run(bodies.save_load, setup, [{**case, "optim_in_backward": True}], API)[0]) == 1


def test_single_process_save_load():
    """test_single_gpu: no wrapper; the model's copy is the "distributed" one."""
    assert len(_inline(bodies.save_load, "single", [{"optimizer": "adam"}, {"optimizer": "adamw"}])) == 2


def test_strict_reports_or_raises_on_missing_and_unexpected_keys():
    """test_strict."""
    assert _inline(bodies.strict) == "ok"


@pytest.mark.skipif(API == "torch", reason="torch's FSDP1 full state dict with cpu_offload crashes on CPU")
def test_cpu_offload_and_full_state_dict_under_fsdp1(pool2):
    """test_cpu_offload_full_state_dict."""
    assert pool2.run(bodies.cpu_offload_full_state_dict, API) == [["adam", "adamw"]] * 2


def test_activation_checkpointing_prefixes_are_removed_under_ddp(pool2):
    """test_activation_ckpt_fqns_ddp."""
    keys = pool2.run(bodies.activation_ckpt_fqns, "ddp", API)
    assert keys[0] == keys[1] and "u1.seq.1.weight" in keys[0]


@pytest.mark.parametrize("wrapper", ["fsdp1_orig", "fsdp1_flat"], ids=["use_orig_params", "flat"])
def test_activation_checkpointing_prefixes_are_removed_under_fsdp1(wrapper, pool2):
    """test_activation_ckpt_fqns_fsdp1."""
    keys = pool2.run(bodies.activation_ckpt_fqns, wrapper, API)
    assert keys[0] == keys[1] and "u1.seq.1.weight" in keys[0]


def test_extra_state_round_trips_under_ddp(pool2):
    """test_extra_state."""
    assert pool2.run(bodies.extra_state, API) == ["ok", "ok"]


def test_non_persistent_buffers_stay_out_under_ddp(pool2):
    """test_non_persistent_buffers."""
    assert pool2.run(bodies.non_persistent_buffers, API) == ["ok", "ok"]


def test_broadcast_from_rank0_into_fsdp2_and_fsdp1(pool2):
    """test_broadcast_from_rank0."""
    assert pool2.run(bodies.broadcast_from_rank0, ["fsdp2", "fsdp1"], API) == [["fsdp2", "fsdp1"]] * 2


def test_broadcast_from_rank0_into_hybrid_sharded_fsdp1(pool4):
    """test_broadcast_from_rank0_hsdp: HYBRID_SHARD on a 2 x 2 mesh."""
    assert pool4.run(bodies.broadcast_from_rank0, ["hsdp"], API) == [["hsdp"]] * 4


def test_get_before_fsdp1_root_is_initialised(pool2):
    """test_fsdp_root_not_initialized."""
    assert pool2.run(bodies.fsdp_root_not_initialized, API) == ["ok", "ok"]


def test_initial_lr_is_saved_and_broadcast_into_the_param_groups(pool2):
    """test_optim_state_dict_param_matching."""
    has_initial_lr = pool2.run(bodies.optim_state_dict_param_matching, API)
    assert has_initial_lr[0] == [True]  # torch's test checks rank 0 only
    if API == "sdtree":
        # torch leaves rank 1 without it (it broadcasts the state, not the
        # param groups' hyper-parameters); sdtree loads every rank alike
        assert has_initial_lr[1] == [True]


def test_full_optimizer_state_loads_as_dtensors_under_fsdp2(pool2):
    """test_optim_state_dict_tensor_matching."""
    assert pool2.run(bodies.optim_state_dict_tensor_matching, API) == ["ok", "ok"]


def test_flat_and_nested_optimizer_state_dicts_load_alike(pool2):
    """test_flattened_osd."""
    assert pool2.run(bodies.flattened_osd, API) == ["ok", "ok"]


def test_deprecated_submodules_and_module_keyed_input_still_work():
    """test_deprecate_partial."""
    assert _inline(bodies.deprecate_partial) == "ok"


def test_fsdp_state_dict_type_deprecation_is_not_passed_on(pool2):
    """test_deprecate_fsdp_api (also for the FSDP1 model itself)."""
    assert pool2.run(bodies.deprecate_fsdp_api, API) == ["ok", "ok"]


def test_tied_weights_under_fsdp1_save_load(pool2):
    """test_shared_weight: an embedding tied to the decoder, nested and flat
    optimizer state dicts (the model shrunk from 10000 x 300 to 100 x 16)."""
    cases = [{"optimizer": "adamw"}, {"optimizer": "adamw", "flatten": True}]
    assert len(pool2.run(bodies.save_load, "tied", cases, API)[0]) == 2


def test_without_a_process_group():
    """test_no_dist (TestNoComm)."""
    assert _inline(bodies.no_dist) == "ok"
