"""Pending outputs inside pipelines: a tensor rule followed by a step that
never reads values plans cheap pending outputs; users see meta tensors only,
and plans, conversions and materialised results are those of running the
steps one by one."""

import attrs
import pytest
import torch

from sdtree.checkpoint import convert, load
from sdtree.checkpoint._lazy import first_aliases
from sdtree.recipes import llama
from sdtree.testing import assert_state_dict_equal
from sdtree.transforms import (
    Transform,
    add_prefix,
    cast,
    drop_keys,
    flatten_optimizer,
    fuse,
    pipeline,
    rename,
    split,
    strip_prefix,
    unpermute_for_rope,
)
from sdtree.transforms.compose import pipeline_steps
from sdtree.transforms.plans import Columns, Pending, settle
from sdtree.transforms.rules import Materializer, derivation_of, materialize

SHAPE = dict(n_heads=4, n_kv_heads=2, dim=16)


def _hf(layers=2, device="cpu"):
    g = torch.Generator().manual_seed(0)
    head_dim = SHAPE["dim"] // SHAPE["n_heads"]
    kv = SHAPE["n_kv_heads"] * head_dim
    shapes = {
        "self_attn.q_proj": (16, 16), "self_attn.k_proj": (kv, 16), "self_attn.v_proj": (kv, 16),
        "self_attn.o_proj": (16, 16), "mlp.gate_proj": (24, 16), "mlp.up_proj": (24, 16), "mlp.down_proj": (16, 24),
    }
    sd = {"model.embed_tokens.weight": torch.randn(32, 16, generator=g)}
    for i in range(layers):
        for name, shape in shapes.items():
            sd[f"model.layers.{i}.{name}.weight"] = torch.randn(shape, generator=g)
        sd[f"model.layers.{i}.input_layernorm.weight"] = torch.rand(16, generator=g)
        sd[f"model.layers.{i}.post_attention_layernorm.weight"] = torch.rand(16, generator=g)
    sd["model.norm.weight"] = torch.rand(16, generator=g)
    sd["lm_head.weight"] = torch.randn(32, 16, generator=g)
    return sd


def _meta(sd):
    return {k: torch.empty(v.shape, dtype=v.dtype, device="meta") for k, v in sd.items()}


def _adam(model):
    return {
        "state": {k: {"step": torch.tensor(3.0), "exp_avg": v * 2, "exp_avg_sq": v * v} for k, v in model.items()},
        "param_groups": [{"params": list(model), "lr": 0.1}],
    }


RECIPE = llama.hf_to_torchtitan(**SHAPE, fuse_qkv=True, fuse_w13=True)


@attrs.frozen
class _OneByOne(Transform):
    """The steps of a pipeline applied one at a time, as a user's loop would:
    no pending outputs anywhere (what pipelines did before they had them)."""

    inner: Transform

    def __call__(self, state_dict, /):
        for step in pipeline_steps(self.inner):
            state_dict = step(state_dict)
        return state_dict


@attrs.frozen
class _Looking(Transform):
    """A user's transform that reads every value: it must see tensors only."""

    seen: list = attrs.field(factory=list, eq=False)

    def __call__(self, state_dict, /):
        self.seen.extend(type(v) for v in state_dict.values())
        return dict(state_dict)


def _leaves(tree):
    if isinstance(tree, dict):
        for value in tree.values():
            yield from _leaves(value)
    elif isinstance(tree, (list, tuple)):
        for value in tree:
            yield from _leaves(value)
    else:
        yield tree


def _fetch(source, metas):
    """Read a meta tensor of ``metas`` from ``source``, as a checkpoint reads its placeholders."""
    names = {id(v): k for k, v in metas.items()}
    return lambda t: source[names[id(t)]]


def test_a_pipeline_hands_out_meta_tensors_only():
    metas = _meta(_hf())
    out = RECIPE(metas)
    assert not any(isinstance(v, Pending) for v in out.values())
    assert all(type(v) is torch.Tensor and v.is_meta for v in out.values())
    # the intermediate q and k were pending: the fused wqkv's sources are pending outputs, not meta tensors
    sources = derivation_of(out["layers.0.attention.wqkv.weight"])[0].sources
    assert [type(s) for s in sources] == [Pending, Pending, torch.Tensor]


def test_a_pipeline_plans_as_its_steps_one_by_one():
    sd = _hf()
    metas = _meta(sd)
    fetch = _fetch(sd, metas)
    at_once, one_by_one = RECIPE(metas), _OneByOne(RECIPE)(metas)
    assert list(at_once) == list(one_by_one)
    for key, planned in at_once.items():
        assert (planned.shape, planned.dtype) == (one_by_one[key].shape, one_by_one[key].dtype)
        assert torch.equal(materialize(planned, fetch), materialize(one_by_one[key], fetch))
    read = Materializer(at_once, fetch)
    assert_state_dict_equal({k: read(v) for k, v in at_once.items()}, RECIPE(sd))


@pytest.mark.parametrize("form", ["pair", "optim", "flat"])
def test_no_pending_output_reaches_an_optimizer_form(form):
    model = _hf()
    metas = _meta(model)
    optim = _adam(metas)
    tree = {"pair": (metas, optim), "optim": optim, "flat": flatten_optimizer()(optim)}[form]
    out = RECIPE(tree)
    leaves = list(_leaves(out))
    assert not any(isinstance(v, Pending) for v in leaves)
    if form == "pair":
        assert all(v.is_meta for v in out[0].values())
        assert out[1]["param_groups"][0]["params"] == list(out[0])


def test_a_users_transform_inside_a_pipeline_sees_tensors_only():
    looking = _Looking()
    rope = unpermute_for_rope("layers.{i}.attention.wq.weight", n_heads=4)
    steps = pipeline(rename({"model.layers.{i}.self_attn.q_proj.weight": "layers.{i}.attention.wq.weight"}), rope, looking,
                     strip_prefix("layers.", strict=False), add_prefix("m."))
    out = steps(_meta(_hf()))
    assert looking.seen and all(t is torch.Tensor for t in looking.seen)
    assert all(type(v) is torch.Tensor for v in out.values())


def test_a_step_that_reads_values_gets_meta_tensors():
    # cast reads the dtypes of real tensors: the pipeline settles before it
    out = pipeline(unpermute_for_rope("l.{i}.q", n_heads=2), cast(torch.float64), add_prefix("m."))(
        {"l.0.q": torch.empty(4, 3, device="meta")}
    )
    assert out["m.l.0.q"].dtype == torch.float64 and type(out["m.l.0.q"]) is torch.Tensor
    assert derivation_of(out["m.l.0.q"])[0].rule == "cast"


def test_planned_outputs_are_distinct_tensors_never_tied():
    metas = {f"l.{i}.{w}": torch.empty(4, 3, device="meta") for i in range(3) for w in "ab"}
    for step in (fuse(["l.{i}.a", "l.{i}.b"], "l.{i}.ab"), fuse(["l.{i}.a", "l.{i}.b"], "l.{i}.ab") >> add_prefix("m.")):
        out = list(step(metas).values())
        assert len({id(t) for t in out}) == len(out)
        assert first_aliases(out) == list(range(len(out)))


def test_settle_makes_one_meta_tensor_of_a_pending_output_held_twice():
    columns = unpermute_for_rope("l.{i}.q", n_heads=2)._call({"l.0.q": torch.empty(4, 3, device="meta")}, True)
    assert type(columns) is Columns and columns.keys == ["l.0.q"]
    (pending,) = columns.values
    assert type(pending) is Pending
    out = settle({"a": pending, "b": pending, "c": 1})
    assert out["a"] is out["b"] and type(out["a"]) is torch.Tensor and out["c"] == 1
    assert derivation_of(out["a"]) == derivation_of(pending)
    plain = {"a": torch.ones(1)}
    assert settle(plain) is plain


def test_split_outputs_pending_then_consumed():
    metas = {"w": torch.empty(6, 2, device="meta")}
    sd = {"w": torch.arange(12.0).reshape(6, 2)}
    steps = split("w", ["a", "b", "c"]) >> fuse(["a", "c"], "ac") >> rename({"b": "bb"})
    out = steps(metas)
    assert list(out) == ["ac", "bb"] and all(type(v) is torch.Tensor for v in out.values())
    fetch = lambda t: sd["w"]  # noqa: E731  # the one source
    assert_state_dict_equal({k: materialize(v, fetch) for k, v in out.items()}, steps(sd))


def _outcome(transform, tree):
    """What ``transform`` makes of ``tree``: its keys, shapes and values, or its error."""
    try:
        out = transform(tree)
    except Exception as err:  # noqa: BLE001  # the error is the outcome compared
        return type(err), str(err)
    model, optim = out if isinstance(out, tuple) else (out, None)
    assert type(model) is dict and not any(isinstance(v, Pending) for v in model.values())
    entries = [(k, tuple(v.shape), v.is_meta or v.tolist()) for k, v in model.items()]
    if optim is None:
        return entries
    return entries, {k: sorted(v) for k, v in optim["state"].items()}, optim["param_groups"][0]["params"]


LAYERS = {f"l.{i}.{n}": torch.full((2, 3), float(i)) for i in range(3) for n in ("a", "b", "c")}
AB = fuse(["l.{i}.a", "l.{i}.b"], "l.{i}.ab")


@pytest.mark.parametrize(
    "steps, tree",
    [
        # the state dict passes from step to step as plans.Columns: the keys each step makes are new and distinct
        (rename({"l.{i}.c": "l.{i}.cc"}) >> AB >> add_prefix("m."), LAYERS),
        (strip_prefix("l.0.", strict=False) >> AB >> add_prefix("m."), LAYERS),
        # a rename that makes two keys one: the same collision error as the rename alone
        (rename({"l.{i}.c": "l.{i}.a"}) >> AB >> add_prefix("m."), LAYERS),
        (add_prefix("m.") >> rename({"m.l.0.a": "m.l.0.b"}) >> fuse(["m.l.{i}.a", "m.l.{i}.b"], "m.l.{i}.ab"), LAYERS),
        # a fuse whose target is a key already there, first or later in the pipeline
        (AB >> add_prefix("m."), {**LAYERS, "l.1.ab": torch.ones(1)}),
        (AB >> fuse(["l.{i}.ab", "l.{i}.c"], "l.{i}.x") >> add_prefix("m."), {**LAYERS, "l.2.x": torch.ones(1)}),
        (AB >> fuse(["l.{i}.ab", "l.{i}.c"], "l.{i}.x") >> add_prefix("m."), LAYERS),
        # keys dropped on the way; a step that matches nothing; a pair with its optimizer
        (AB >> drop_keys("l.1.") >> add_prefix("m."), LAYERS),
        (fuse(["x.{i}.a", "x.{i}.b"], "x.{i}.ab", strict=False) >> AB >> add_prefix("m."), LAYERS),
        (rename({"l.{i}.c": "l.{i}.cc"}) >> AB >> add_prefix("m."), (LAYERS, _adam(LAYERS))),
        # a rule in the middle whose groups come out of order
        (rename({"l.{i}.a": "z.{i}.a"}) >> fuse(["l.{i}.b", "z.{i}.a"], "l.{i}.ba") >> add_prefix("m."), LAYERS),
    ],
)
@pytest.mark.parametrize("meta", [False, True])
def test_a_pipeline_gives_what_its_steps_give_one_by_one(steps, tree, meta):
    if meta:
        tree = (_meta(tree[0]), _adam(_meta(tree[0]))) if isinstance(tree, tuple) else _meta(tree)
    assert _outcome(steps, tree) == _outcome(_OneByOne(steps), tree)


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_convert_plans_and_writes_as_the_steps_one_by_one(tmp_path, suffix):
    sd = _hf()
    src = tmp_path / f"hf{suffix}"
    if suffix == ".pt":
        torch.save(sd, src)
    else:
        from safetensors.torch import save_file

        save_file(sd, src)
    at_once = convert(src, tmp_path / f"a{suffix}", transform=RECIPE)
    one_by_one = convert(src, tmp_path / f"b{suffix}", transform=_OneByOne(RECIPE))
    dry = convert(src, tmp_path / f"c{suffix}", transform=RECIPE, dry_run=True)
    assert at_once.streamed and one_by_one.streamed
    assert at_once.plan == one_by_one.plan == dry.plan
    assert at_once.peak_bytes == one_by_one.peak_bytes == dry.peak_bytes
    wqkv = {p.key: p for p in at_once.plan}["layers.1.attention.wqkv.weight"]
    assert wqkv.sources == tuple(f"model.layers.1.self_attn.{w}_proj.weight" for w in "qkv")
    assert wqkv.rules == ("unpermute_for_rope", "fuse")
    assert_state_dict_equal(load(tmp_path / f"a{suffix}"), RECIPE(sd))
    assert_state_dict_equal(load(tmp_path / f"a{suffix}"), load(tmp_path / f"b{suffix}"))
