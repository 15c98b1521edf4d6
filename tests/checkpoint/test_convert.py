import weakref

import attrs
import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader

import sdtree
from sdtree._tree import tree_map
from sdtree.checkpoint import Checkpoint, convert, load, save
from sdtree.errors import DestinationExistsError, KeyCollisionError, NothingToWriteError
from sdtree.testing import assert_state_dict_equal
from sdtree.transforms import Transform, at, each, rename, select_keys, strip_prefix
from tests.checkpoint import cases

FORMATS = {"dcp": "ckpt", "torch": "ckpt.pt", "safetensors": "ckpt.safetensors"}
CLEAN = strip_prefix("_orig_mod.") >> rename([(r"^mlp\.(\d+)\.", r"ffn.\1.")])


def _source(tmp_path, fmt):
    checkpoint = cases.compiled(cases.combined())
    if fmt == "safetensors":
        checkpoint = checkpoint["model"]
    path = tmp_path / "src" / FORMATS[fmt]
    save(checkpoint, path)
    return path, checkpoint


def _expected(checkpoint, dst_fmt):
    if "model" not in checkpoint:
        return CLEAN(checkpoint)
    if dst_fmt == "safetensors":
        return CLEAN(checkpoint["model"])
    return {**checkpoint, "model": CLEAN(checkpoint["model"]), "optim": CLEAN(checkpoint["optim"])}


@pytest.mark.parametrize("dst_fmt", sorted(FORMATS))
@pytest.mark.parametrize("src_fmt", sorted(FORMATS))
def test_convert_between_every_pair_of_formats_with_a_transform(tmp_path, src_fmt, dst_fmt):
    src, checkpoint = _source(tmp_path, src_fmt)
    dst = tmp_path / "out" / FORMATS[dst_fmt]
    done = convert(src, dst, transform=CLEAN, model_only=dst_fmt == "safetensors")
    assert (done.src_format, done.dst_format, done.streamed, done.written) == (src_fmt, dst_fmt, True, True)
    expected = _expected(checkpoint, dst_fmt)
    loaded = load(dst)
    assert_state_dict_equal(loaded, expected)
    assert list(loaded) == list(expected)
    assert [p.name for p in dst.parent.iterdir()] == [dst.name]  # no temporary left


def test_conversion_reports_the_key_mapping(tmp_path):
    src, _ = _source(tmp_path, "torch")
    done = convert(src, tmp_path / "m.safetensors", transform=CLEAN, model_only=True)
    renamed = dict(done.renamed)
    assert renamed["model._orig_mod.mlp.0.weight"] == "ffn.0.weight"
    assert renamed["model._orig_mod.embed.weight"] == "embed.weight"
    assert renamed["optim.state._orig_mod.mlp.0.weight.exp_avg"] is None  # not in a safetensors file
    assert done.tensors == 6  # embed/head stored once
    assert done.nbytes == sum(t.numel() * t.element_size() for t in {id(t): t for t in load(tmp_path / "m.safetensors").values()}.values())


def test_dry_run_writes_nothing_even_over_an_existing_destination(tmp_path):
    src, _ = _source(tmp_path, "dcp")
    (tmp_path / "out.pt").write_bytes(b"keep")
    done = convert(src, tmp_path / "out.pt", transform=CLEAN, dry_run=True)
    assert not done.written and ("model._orig_mod.mlp.2.bias", "model.ffn.2.bias") in done.renamed
    assert (tmp_path / "out.pt").read_bytes() == b"keep"


def test_collision_raises_naming_both_keys_and_leaves_no_output(tmp_path):
    src, _ = _source(tmp_path, "torch")
    collide = rename([(r"\.(weight|bias)$", ".param")])
    with pytest.raises(KeyCollisionError, match=r"keys '_orig_mod\.mlp\.0\.weight' and '_orig_mod\.mlp\.0\.bias' both map to '_orig_mod\.mlp\.0\.param'"):
        convert(src, tmp_path / "out" / "ckpt", transform=collide)
    assert not (tmp_path / "out").exists()


def test_existing_destination_needs_force(tmp_path):
    src, checkpoint = _source(tmp_path, "torch")
    for dst in (tmp_path / "old.pt", tmp_path / "olddir"):
        save({"old": torch.zeros(1)}, dst)
        with pytest.raises(DestinationExistsError, match=r"'.*old(dir|\.pt)' already exists.*force=True"):
            convert(src, dst)
        assert "old" in load(dst)
        convert(src, dst, force=True)
        assert_state_dict_equal(load(dst), checkpoint)
    (tmp_path / "was_a_file").write_bytes(b"x")
    convert(src, tmp_path / "was_a_file", to="dcp", force=True)
    assert_state_dict_equal(load(tmp_path / "was_a_file"), checkpoint)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old.pt", "olddir", "src", "was_a_file"]


def test_model_only_keeps_just_the_model(tmp_path):
    src, checkpoint = _source(tmp_path, "dcp")
    convert(src, tmp_path / "m.pt", model_only=True)
    assert_state_dict_equal(load(tmp_path / "m.pt"), {"model": checkpoint["model"]})


def test_int_keyed_optimizer_is_kept_by_key_transforms(tmp_path):
    model, optim = cases.trained()
    torch.save({"model": model.state_dict(), "optim": optim.state_dict()}, tmp_path / "raw.pt")
    convert(tmp_path / "raw.pt", tmp_path / "out.pt", transform=rename([("^mlp", "ffn")]))
    loaded = load(tmp_path / "out.pt")
    assert "ffn.0.weight" in loaded["model"]
    assert_state_dict_equal(loaded["optim"], optim.state_dict())


def test_an_optimizer_under_another_name_is_renamed_with_the_model(tmp_path):
    checkpoint = cases.compiled(cases.combined())
    trainer = {"model": checkpoint["model"], "optimizer": checkpoint["optim"], "step": 3}  # as trainers name it
    save(trainer, tmp_path / "src.pt")
    convert(tmp_path / "src.pt", tmp_path / "out.pt", transform=CLEAN)
    assert_state_dict_equal(load(tmp_path / "out.pt"), {"model": CLEAN(trainer["model"]), "optimizer": CLEAN(trainer["optimizer"]), "step": 3})


def test_a_transform_that_says_where_it_applies_is_applied_as_written(tmp_path):
    src, checkpoint = _source(tmp_path, "torch")
    convert(src, tmp_path / "each.pt", transform=each(CLEAN))  # what transform=CLEAN does
    assert_state_dict_equal(load(tmp_path / "each.pt"), _expected(checkpoint, "torch"))
    convert(src, tmp_path / "at.pt", transform=at("model", CLEAN) >> at("optim", strip_prefix("_orig_mod.")))
    expected = {**checkpoint, "model": CLEAN(checkpoint["model"]), "optim": strip_prefix("_orig_mod.")(checkpoint["optim"])}
    assert_state_dict_equal(load(tmp_path / "at.pt"), expected)


def test_convert_reads_trusted_legacy_torch_save_files(tmp_path):
    sd = cases.model_state_dict()
    torch.save(sd, tmp_path / "old.pt", _use_new_zipfile_serialization=False)
    convert(tmp_path / "old.pt", tmp_path / "new.safetensors", trust_pickle=True)
    assert_state_dict_equal(load(tmp_path / "new.safetensors"), sd)


@attrs.frozen(repr=False)
class _Double(Transform):
    _factory = "double"

    def __call__(self, state_dict, /):
        return tree_map(lambda x: x * 2 if isinstance(x, torch.Tensor) and x.is_floating_point() else x, state_dict)


def test_a_transform_that_makes_tensors_converts_from_the_loaded_checkpoint(tmp_path):
    sd = {"w": torch.ones(3), "n": torch.arange(2)}
    save(sd, tmp_path / "a.pt")
    done = convert(tmp_path / "a.pt", tmp_path / "b.safetensors", transform=_Double())
    assert not done.streamed
    assert_state_dict_equal(load(tmp_path / "b.safetensors"), {"w": torch.full((3,), 2.0), "n": torch.arange(2)})


class _Memory(bytearray):
    """The bytes of one fetched tensor; a weak reference to it tells when they are freed."""


@pytest.mark.parametrize("dst_fmt", sorted(FORMATS))
@pytest.mark.parametrize("src_fmt", ["dcp", "torch", "safetensors"])
def test_conversion_holds_one_fetched_tensor_at_a_time(tmp_path, monkeypatch, src_fmt, dst_fmt):
    src, _ = _source(tmp_path, src_fmt)
    alive, most = [], []
    fetch = Checkpoint.borrow  # what a conversion reads through

    def tracking_fetch(self, tensor):
        # Track the memory, not the tensor object: a writer may keep a view
        # (tensor.detach()) of it. Tensors hold no cycles: refcounting frees them at once.
        most.append(sum(ref() is not None for ref in alive))
        out = fetch(self, tensor)
        if out.numel() == 0:
            return out
        memory = _Memory(out.numel() * out.element_size())
        tracked = torch.frombuffer(memory, dtype=out.dtype).view(out.shape).copy_(out)
        alive.append(weakref.ref(memory))
        return tracked

    monkeypatch.setattr(Checkpoint, "borrow", tracking_fetch)
    monkeypatch.setattr(Checkpoint, "span", lambda self, leaf: None)  # every tensor fetched (none copied by the kernel)
    convert(src, tmp_path / FORMATS[dst_fmt], model_only=True)
    assert len(most) > 5 and max(most) <= 1


def test_progress_reports_every_byte(tmp_path):
    src, _ = _source(tmp_path, "dcp")
    calls = []
    done = convert(src, tmp_path / "out.pt", progress=lambda n, total: calls.append((n, total)))
    assert sum(n for n, _ in calls) == done.nbytes and {t for _, t in calls} == {done.nbytes}


@pytest.mark.parametrize("dry_run", [False, True])
def test_a_transform_that_drops_every_tensor_writes_nothing(tmp_path, dry_run):
    src, _ = _source(tmp_path, "torch")
    dst = tmp_path / "out" / "ckpt"
    with pytest.raises(
        NothingToWriteError,
        match=r"^convert: the transform select_keys\('model\.'\) drops all 22 tensors of '.*ckpt\.pt' \('model\._orig_mod\.scale', .*\), "
        r"so the result would hold no tensor \(only 'optim\.param_groups\.0\.lr', .* \(20 more\)\): nothing to write\. Nothing was written\. "
        r"Check its rules .* without 'model\.' or 'optim\.' in front\.$",
    ):
        convert(src, dst, transform=select_keys("model."), dry_run=dry_run)
    assert not (tmp_path / "out").exists()


def test_model_only_needs_a_model_entry(tmp_path):
    save(cases.model_state_dict(), tmp_path / "plain.pt")
    with pytest.raises(NothingToWriteError, match=r"model_only=True \(--model-only\) writes the 'model' entry .* but '.*plain\.pt' has no 'model' state dict \(top-level keys: 'scale', 'embed\.weight', .*\)\. Nothing was written\. Convert it without model_only"):
        convert(tmp_path / "plain.pt", tmp_path / "m.safetensors", model_only=True)
    model, optim = cases.trained()
    save({"model": {}, "optim": sdtree.get_optimizer_state_dict(model, optim)}, tmp_path / "no_model.pt")
    with pytest.raises(NothingToWriteError, match=r"the 'model' entry of '.*no_model\.pt', all that model_only=True \(--model-only\) keeps, holds no tensor: nothing to write"):
        convert(tmp_path / "no_model.pt", tmp_path / "m.pt", model_only=True)
    save({"step": 3}, tmp_path / "step.pt")
    with pytest.raises(NothingToWriteError, match=r"'.*step\.pt' holds no tensor \(only 'step'\): nothing to write"):
        convert(tmp_path / "step.pt", tmp_path / "s.pt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["no_model.pt", "plain.pt", "step.pt"]


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")  # dcp.load(no_dist=True) warns anyway
@pytest.mark.parametrize("how", ["convert", "save"])
def test_a_dcp_checkpoint_is_one_data_file_that_names_its_final_path(tmp_path, how):
    checkpoint = cases.combined()
    dst = tmp_path / "ckpt"
    if how == "convert":
        save(checkpoint, tmp_path / "src.pt")
        convert(tmp_path / "src.pt", dst)
    else:
        save(checkpoint, dst)
    assert sorted(p.name for p in dst.iterdir()) == [".metadata", "__0_0.distcp"]
    assert FileSystemReader(dst).read_metadata().storage_meta.checkpoint_id == dst
    # torch reads it back, bit for bit
    template = tree_map(lambda x: torch.empty_like(x) if isinstance(x, torch.Tensor) else x, checkpoint)
    template["step"] = 0
    dcp.load(template, storage_reader=FileSystemReader(dst), no_dist=True)
    assert_state_dict_equal(template, checkpoint)


@pytest.mark.parametrize("dst_fmt", ["torch", "safetensors", "dcp"])
def test_tensor_transforms_stream_one_group_at_a_time(tmp_path, monkeypatch, dst_fmt):
    from sdtree.transforms import fuse, map_tensors, permute_for_rope, split

    g = torch.Generator().manual_seed(0)
    model = {}
    for i in range(3):
        model.update({f"l.{i}.q": torch.randn(8, 4, generator=g), f"l.{i}.k": torch.randn(4, 4, generator=g), f"l.{i}.w13": torch.randn(6, 4, generator=g)})
    model["norm"] = torch.ones(4)
    save(model, tmp_path / "src.safetensors")
    rule = (
        permute_for_rope("l.{i}.q", n_heads=2)
        >> fuse(["l.{i}.q", "l.{i}.k"], "l.{i}.qk", sizes=(8, 4))
        >> split("l.{i}.w13", ["l.{i}.w1", "l.{i}.w3"])
    )
    reads, copied = [], []
    borrow, span = Checkpoint.borrow, Checkpoint.span  # what a conversion reads through
    monkeypatch.setattr(Checkpoint, "borrow", lambda self, t: reads.append(t) or borrow(self, t))
    monkeypatch.setattr(Checkpoint, "span", lambda self, t: (found := span(self, t)) and (copied.append(t) or found))
    done = convert(tmp_path / "src.safetensors", tmp_path / FORMATS[dst_fmt], transform=rule)
    # every source read once, w13 once for both halves; where the writer copies spans (dcp, safetensors), norm,
    # written as stored, and each k, stored as the qk fuse (dim 0) writes it after q, are copied by the kernel
    assert done.streamed and len(reads) + len(copied) == len(model)
    assert len(copied) == (4 if dst_fmt in ("dcp", "safetensors") else 0)
    assert_state_dict_equal(load(tmp_path / FORMATS[dst_fmt]), rule(model))
    # a function that cannot run on meta tensors: the source is loaded whole instead, and still right
    needs_data = map_tensors(lambda t: t * float(t.sum() > -1e9), where="norm")
    done = convert(tmp_path / "src.safetensors", tmp_path / ("b" + FORMATS[dst_fmt]), transform=needs_data)
    assert not done.streamed
    assert_state_dict_equal(load(tmp_path / ("b" + FORMATS[dst_fmt])), needs_data(model))
