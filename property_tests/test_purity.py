"""Law: no transform or utility mutates its input, and leaves it does not
change come back as the very same objects."""

import importlib
import pkgutil

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import sdtree
import sdtree.transforms as _transforms
from sdtree.errors import SdtreeError
from sdtree.transforms import (
    add_prefix,
    broadcast,
    cast,
    combined,
    compose,
    drop_keys,
    drop_meta_tensors,
    flatten_optimizer,
    fqns_to_param_ids,
    fuse,
    gather,
    groups,
    identity,
    map_tensors,
    merge_optimizers,
    nested,
    offload_to_cpu,
    optimizer_layout,
    param_ids_to_fqns,
    patterns,
    permute_for_rope,
    pipeline,
    plans,
    rename,
    reshape,
    rules,
    select_keys,
    sharding,
    split,
    split_optimizer,
    stack,
    strip_prefix,
    tensors,
    to_device,
    transpose,
    unflatten_optimizer,
    unpermute_for_rope,
    unstack,
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


# -- every export of sdtree/transforms/, on every form it takes -----------------
EXPORTS = sorted(
    {
        name
        for info in pkgutil.iter_modules(_transforms.__path__)
        for name in importlib.import_module(f"sdtree.transforms.{info.name}").__all__
    }
    | set(_transforms.__all__)
)

# Exports that are not functions of state dicts: classes, types and constants.
NOT_FUNCTIONS = {
    "Transform", "OptimizerLayout", "KeyPattern", "PatternSet", "Op", "Misfit", "Spec", "Derivation",
    "TensorRule", "Group", "Grouping", "Announcement", "Path", "DEFAULT_BUCKET_BYTES", "dtensor_type", "sharded_tensor_type",
    "MODEL", "OPTIM", "Pending", "Planned", "Columns", "GatherPlan",
    # the ops and rule classes behind the tensor transforms: their factories are checked
    "CatOp", "SplitOp", "StackOp", "UnbindOp", "RopeOp", "TransposeOp", "ReshapeOp", "CastOp", "MapOp", "Sizes",
    "PatternRule", "Fuse", "Split", "Stacking", "Stack", "Unstack", "Unary", "PermuteForRope", "UnpermuteForRope",
    "TransposeRule", "ReshapeRule", "CastRule", "MapTensors", "Where", "EXACT_WIDENINGS",
}
# Exports whose inputs are DTensors: checked in a process group, by
# tests/transforms/test_distributed.py::test_collective_transforms_leave_their_inputs_untouched.
IN_THE_POOL = {"shard_like", "shard_as", "local_slice", "rows_by_rank"}  # need DTensors: the pool's tests


def _samples():
    g = torch.Generator().manual_seed(0)
    model = {f"layers.{i}.{n}.weight": torch.randn(4, 2, generator=g) for i in range(2) for n in ("q", "k")}
    model["norm.weight"] = torch.ones(2)
    optim = {
        "state": {k: {"step": torch.tensor(1.0), "exp_avg": torch.randn(v.shape, generator=g), "exp_avg_sq": torch.rand(v.shape, generator=g)} for k, v in model.items()},
        "param_groups": [{"lr": 0.1, "params": list(model)}],
    }
    return model, optim, flatten_optimizer()(optim)


def _tensor_rules():
    q = "layers.{i}.q.weight"
    return {
        "fuse": fuse([q, "layers.{i}.k.weight"], "layers.{i}.qk.weight", sizes=(4, 4)),
        "split": split(q, ["layers.{i}.q1.weight", "layers.{i}.q2.weight"], sizes=(2, 2)),
        "stack": stack(q, "q.weight", over="i"),
        "permute_for_rope": permute_for_rope(q, n_heads=2),
        "unpermute_for_rope": unpermute_for_rope(q, n_heads=2),
        "transpose": transpose(q, 0, 1),
        "reshape": reshape(q, (8,), from_shape=(4, 2)),
        "cast": cast(torch.float64, where=q),
        "map_tensors": map_tensors(lambda t: t * 2, where=q),
    }


def _calls(name):
    """``[(function, args)]``: the calls of export ``name`` whose args must come back untouched."""
    model, optim, flat = _samples()
    forms = [model, optim, flat]
    key_transforms = {
        "identity": identity(),
        "pipeline": pipeline(strip_prefix("layers.", strict=False), add_prefix("m.")),
        "strip_prefix": strip_prefix("layers.", strict=False),
        "add_prefix": add_prefix("m."),
        "rename": rename({"norm.weight": "ln.weight"}),
        "select_keys": select_keys("layers."),
        "drop_keys": drop_keys("norm."),
        "drop_meta_tensors": drop_meta_tensors(),
        "offload_to_cpu": offload_to_cpu(),
        "to_device": to_device("cpu"),
        "gather_dtensors": gather.gather_dtensors(),
        "keep_on_ranks": gather.keep_on_ranks((0,)),
        "broadcast_from_rank0": broadcast.broadcast_from_rank0(),
    }
    if name in key_transforms:
        return [(key_transforms[name], (sd,)) for sd in forms]
    combined_sd = {"model": model, "optim": optim, "step": 3}
    step = strip_prefix("layers.", strict=False)
    combined_calls = {
        "at": [(combined.at("model", step), (combined_sd,))],
        "each": [(combined.each(step), (combined_sd,))],
        "is_combined": [(combined.is_combined, (combined_sd,))],
        "optimizer_entries": [(combined.optimizer_entries, (combined_sd,))],
        "acts_on_combined": [(combined.acts_on_combined, (combined.each(step),))],
        "pipeline_steps": [(compose.pipeline_steps, (step >> add_prefix("m."),))],
    }
    if name in combined_calls:
        return combined_calls[name]
    rules_ = _tensor_rules()
    if name in rules_:
        return [(rules_[name], (sd,)) for sd in [*forms, (model, optim)]]
    layout = optimizer_layout(optim)
    ids = {i: k for i, k in enumerate(model)}
    by_ids = param_ids_to_fqns({k: i for i, k in ids.items()})(optim)
    stacked = stack("layers.{i}.q.weight", "q.weight", over="i")((model, optim))
    nested_sd, mapping = nested.flatten_state_dict({"a": {"b": torch.ones(1)}, "c": [torch.zeros(2)]})
    metas = {k: torch.empty(v.shape, device="meta") for k, v in model.items()}
    names = {id(v): k for k, v in metas.items()}
    planned = fuse(["layers.{i}.q.weight", "layers.{i}.k.weight"], "layers.{i}.qk.weight")(metas)["layers.0.qk.weight"]
    pending = permute_for_rope("layers.{i}.q.weight", n_heads=2)._call(metas, True)  # as inside a pipeline
    op, cat, qk = rules.derivation_of(planned)[0].op, rules.derivation_of(planned)[0].op, ("layers.0.q.weight", "layers.0.k.weight")
    plan = lambda names, specs: [(specs[0][0], specs[0][1])] if len(specs) == 1 else cat.plan(names, specs)  # noqa: E731
    table = {
        "optimizer_layout": [(optimizer_layout, (optim,))],
        "param_ids_to_fqns": [(param_ids_to_fqns(ids), (by_ids,))],
        "fqns_to_param_ids": [(fqns_to_param_ids({k: i for i, k in ids.items()}), (optim,))],
        "flatten_optimizer": [(flatten_optimizer(), (optim,))],
        "unflatten_optimizer": [(unflatten_optimizer(layout), (flat,))],
        "merge_optimizers": [(merge_optimizers(), ([optim],))],
        "split_optimizer": [(split_optimizer([layout]), (optim,))],
        "unstack": [(unstack("q.weight", "layers.{i}.q.weight", over="i"), (stacked,))],
        "flatten_state_dict": [(nested.flatten_state_dict, ({"a": {"b": torch.ones(1)}, "c": [torch.zeros(2)]},))],
        "unflatten_state_dict": [(nested.unflatten_state_dict, (nested_sd, mapping))],
        "create_cpu_state_dict": [(tensors.create_cpu_state_dict, (sd,)) for sd in forms],
        "check_state_dict_similarity": [(tensors.check_state_dict_similarity, (model, dict(model)))],
        "offload_state_dict_to_cpu": [(tensors.offload_state_dict_to_cpu, (sd,)) for sd in forms],
        "gather_state_dict": [(gather.gather_state_dict, (sd,)) for sd in forms],
        # it writes only into its destination's tensors at sharded leaves: with none, into nothing
        "gather_into": [(gather.gather_into, (model, {k: v.clone() for k, v in model.items()}))],
        "allocate": [(tensors.allocate, ([(torch.Size([2]), torch.float32)],))],
        "contiguous_strides": [(tensors.contiguous_strides, ((2, 3),))],
        "is_dtensor": [(tensors.is_dtensor, (model["norm.weight"],))],
        "is_sharded_tensor": [(tensors.is_sharded_tensor, (model["norm.weight"],))],
        "local_tensors": [(tensors.local_tensors, (model["norm.weight"],))],
        "rewrap": [(tensors.rewrap, (model["norm.weight"], [model["norm.weight"].clone()]))],
        "path_differences": [(lambda a, b: tensors.path_differences(a, b, missing="gone", extra="new"), (["a", "b"], ["b", "c"]))],
        "pair_leaves": [(tensors.pair_leaves, ("pair_leaves", model, dict(model)))],
        "check_leaf_types": [(tensors.check_leaf_types, ("check_leaf_types", sd)) for sd in forms],
        "row_counts": [(sharding.row_counts, (5, 2))],
        "announce": [(lambda sd: broadcast.announce(sd).deliver(), (sd,)) for sd in forms]
        + [(lambda sd: broadcast.announce(sd).placeholders(), (sd,)) for sd in forms],
        "key_pattern": [(patterns.key_pattern, ("layers.{i}.q.weight",))],
        "is_pattern": [(patterns.is_pattern, ("layers.{i}.q.weight",))],
        "nearest_keys": [(patterns.nearest_keys, ([patterns.key_pattern("layers.{i}.v.weight")], list(model)))],
        "derivation_of": [(rules.derivation_of, (planned,))],
        "materialize": [(lambda p, m: rules.materialize(p, lambda t: m[names[id(t)]]), (planned, model))],
        "Materializer": [(lambda p, m: rules.Materializer({"qk": p}, lambda t: m[names[id(t)]])(p), (planned, model))],
        "meta_outputs": [(lambda p: plans.meta_outputs(rules.derivation_of(p)[0], True, {}), (planned,))],
        "settle": [(plans.settle, (sd,)) for sd in (metas, pending, dict(pending.items()), (pending, optim))],
        "as_dict": [(plans.as_dict, (sd,)) for sd in (metas, pending, (pending, optim))],
        "single_outputs": [
            (lambda p, flag=flag: plans.single_outputs(rules.derivation_of(p)[0].op, [(p,)], [[(p.shape, p.dtype)]], "fuse", flag), (planned,))
            for flag in (False, True)
        ],
        "plan_in_place": [
            (lambda sd, flag=flag: plans.plan_in_place(list(sd.values()), list(sd), [list(sd).index("norm.weight")], op, plan, "cast", flag), (metas,))
            for flag in (False, True)
        ],
        "plan_fused": [
            (lambda sd, flag=flag: plans.plan_fused(list(sd), list(sd.values()), [qk], [list(sd).index(k) for k in qk], ["qk"], cat, plan, "fuse", flag), (metas,))
            for flag in (False, True)
        ],
        "non_str": [(patterns.non_str, (list(model),))],
        "in_turn": [(groups.in_turn, ([0, 1, 0, 1], [("0",), ("0",), ("1",), ("1",)], 2))],
        "in_order": [
            (lambda sd: groups.in_order(list(sd), list(sd.values()), [rules.Group((("i", "0"),), qk)], {qk[0]: [("qk", 1)]}, None), (model,))
        ],
    }
    return table.get(name)


def test_the_purity_walk_covers_every_export():
    """A new export of sdtree/transforms/ needs a case in _calls (or is a
    class, type or constant): then the walk below checks it."""
    uncovered = [n for n in EXPORTS if n not in NOT_FUNCTIONS | IN_THE_POOL and _calls(n) is None]
    assert not uncovered, f"add purity cases for {uncovered}"


@pytest.mark.parametrize("name", [n for n in EXPORTS if n not in NOT_FUNCTIONS | IN_THE_POOL])
def test_every_export_of_transforms_leaves_its_input_untouched(name):
    calls = _calls(name)
    assert calls, name
    for fn, args in calls:
        before = [snapshot(arg) for arg in args]
        fn(*args)
        for old, arg in zip(before, args):
            assert_unchanged(old, arg)
