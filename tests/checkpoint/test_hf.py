"""Hugging Face checkpoint directories (format "hf"): sdtree's own round trips,
and directories read from and written for the real transformers.

The hostile inputs are in ``test_hostile.py``.
"""

import json
import os
import weakref

import pytest
import torch
from safetensors import safe_open

from sdtree.checkpoint import Checkpoint, ShardInfo, convert, describe, detect_format, diff, load, save
from sdtree.checkpoint._hf import parse_size, plan_shards
from sdtree.errors import CheckpointFormatError, NothingToWriteError
from sdtree.testing import assert_state_dict_equal
from sdtree.transforms import select_keys, strip_prefix
from tests.checkpoint import cases
from tests.cli.test_cli import assert_one_error_line, run
from tests.corpus import MODEL_STATE_DICTS

INDEX = "model.safetensors.index.json"
SIZES = {"scale": 8, "embed.weight": 96, "mlp.0.weight": 80, "mlp.0.bias": 20, "mlp.2.weight": 80, "mlp.2.bias": 16}


def _shards(path):
    return sorted(p.name for p in path.iterdir() if p.name != INDEX)


def _check_index_against_shards(path):
    """Check with the safetensors package alone: each shard holds exactly the
    keys the index gives it, and total_size is the bytes of their tensors."""
    index = json.loads((path / INDEX).read_text())
    held, nbytes = {}, 0
    for name in _shards(path):
        with safe_open(str(path / name), framework="pt") as shard:
            assert shard.metadata()["format"] == "pt"  # transformers refuses a shard without it
            for key in shard.keys():
                held[key] = name
                tensor = shard.get_tensor(key)
                nbytes += tensor.numel() * tensor.element_size()
    assert held == index["weight_map"]
    assert index["metadata"]["total_size"] == nbytes
    return index


# -- writing ------------------------------------------------------------------------


def test_save_shards_in_key_order_with_the_index_save_pretrained_writes(tmp_path):
    sd = cases.model_state_dict()  # head.weight is embed.weight
    save(sd, tmp_path / "hf", format="hf", max_shard_size=100)
    assert _shards(tmp_path / "hf") == [f"model-0000{i}-of-00004.safetensors" for i in range(1, 5)]
    index = _check_index_against_shards(tmp_path / "hf")
    shard = {key: int(name[6:11]) for key, name in index["weight_map"].items()}
    assert shard == {"scale": 1, "embed.weight": 2, "mlp.0.weight": 3, "mlp.0.bias": 3, "mlp.2.weight": 4, "mlp.2.bias": 4}
    assert index["metadata"] == {"total_size": sum(SIZES.values()), "sdtree.aliases": [[6, "head.weight", "embed.weight"]]}
    assert (tmp_path / "hf" / INDEX).read_text() == json.dumps(index, indent=2, sort_keys=True) + "\n"  # as transformers writes it


def test_plan_shards_fills_each_shard_in_key_order_and_gives_a_large_tensor_its_own():
    sizes = [("a", 4), ("b", 6), ("c", 1), ("big", 11), ("d", 10), ("e", 0)]
    assert plan_shards(sizes, 10) == [["a", "b"], ["c"], ["big"], ["d", "e"]]
    assert plan_shards(sizes, 100) == [["a", "b", "c", "big", "d", "e"]]
    assert plan_shards([], 10) == [[]]


def test_a_model_that_fits_one_shard_is_a_single_model_safetensors_without_index(tmp_path):
    sd = cases.model_state_dict()
    save(sd, tmp_path / "hf", format="hf")
    assert _shards(tmp_path / "hf") == ["model.safetensors"]  # what save_pretrained writes
    assert detect_format(tmp_path / "hf") == "hf"
    loaded = load(tmp_path / "hf")
    assert_state_dict_equal(loaded, sd)
    assert list(loaded) == list(sd) and loaded["head.weight"] is loaded["embed.weight"]


@pytest.mark.parametrize("max_shard_size", [100, "5GB"], ids=["sharded", "single"])
def test_tied_tensors_are_stored_once_and_load_back_as_one(tmp_path, max_shard_size):
    sd = cases.model_state_dict()
    save(sd, tmp_path / "hf", format="hf", max_shard_size=max_shard_size)
    stored = []
    for name in _shards(tmp_path / "hf"):
        with safe_open(str(tmp_path / "hf" / name), framework="pt") as shard:
            stored += shard.keys()
    assert sorted(stored) == sorted(SIZES)  # head.weight dropped, as Hugging Face does
    loaded = load(tmp_path / "hf")
    assert list(loaded) == list(sd) and loaded["head.weight"] is loaded["embed.weight"]
    summary = describe(tmp_path / "hf")
    assert [(t.key, t.tied_to) for t in summary.tensors if t.tied_to] == [("head.weight", "embed.weight")]


@pytest.mark.parametrize(
    "size, nbytes",
    [("500MB", 500 * 10**6), ("5GB", 5 * 10**9), ("2GiB", 2 * 2**30), ("1.5gb", 1_500_000_000), ("20KB", 20_000), ("64 KiB", 65536), ("1000", 1000), (1, 1)],
)
def test_sizes_parse_as_hugging_face_writes_them(size, nbytes):
    assert parse_size(size, fn="save") == nbytes


@pytest.mark.parametrize("size", ["5XB", "GB", "", "-1GB", 0, -5, True, "1e3MB"])
def test_a_bad_size_is_refused_before_anything_is_read(tmp_path, size):
    with pytest.raises(CheckpointFormatError, match=r"convert: max_shard_size=.* \(--max-shard-size\) is not a size of at least one byte: .*'500MB' or '5GB' \(decimal: 1 GB = 10\*\*9 bytes\), '2GiB'"):
        convert(tmp_path / "absent", tmp_path / "out", to="hf", max_shard_size=size)
    assert sorted(tmp_path.iterdir()) == []


def test_max_shard_size_for_another_format_is_refused(tmp_path):
    save({"w": torch.ones(2)}, tmp_path / "m.pt")
    for call in (
        lambda: convert(tmp_path / "m.pt", tmp_path / "out", max_shard_size="1GB"),
        lambda: save({"w": torch.ones(2)}, tmp_path / "x.safetensors", max_shard_size="1GB"),
    ):
        with pytest.raises(CheckpointFormatError, match=r"max_shard_size='1GB' \(--max-shard-size\) sets the shard size of a Hugging Face directory, but the destination format is '(dcp|safetensors)'\. Pass to='hf'"):
            call()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.pt"]


def test_an_optimizer_or_non_tensor_entry_is_refused_with_the_fix(tmp_path):
    checkpoint = cases.combined()
    save(checkpoint, tmp_path / "ckpt.pt")
    with pytest.raises(CheckpointFormatError, match=r"a Hugging Face \(hf\) directory holds a model state dict only, but the checkpoint also holds 'optim', 'step'\. Pass model_only=True \(--model-only\) .* or write 'dcp' or 'torch'"):
        convert(tmp_path / "ckpt.pt", tmp_path / "hf", to="hf")
    with pytest.raises(CheckpointFormatError, match=r"a Hugging Face \(hf\) directory holds a model state dict only, and this is an optimizer state dict\. Write it as 'dcp' or 'torch'"):
        save(checkpoint["optim"], tmp_path / "hf", format="hf")
    with pytest.raises(CheckpointFormatError, match=r"save: a Hugging Face \(hf\) directory holds a flat \{str: tensor\} model state dict only, but 'count' holds a int\. Drop or convert"):
        save({"w": torch.ones(2), "count": 3}, tmp_path / "hf", format="hf")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.pt"]
    convert(tmp_path / "ckpt.pt", tmp_path / "hf", to="hf", model_only=True)
    assert_state_dict_equal(load(tmp_path / "hf"), checkpoint["model"])


def test_a_write_that_fails_midway_leaves_nothing(tmp_path, monkeypatch):
    save(cases.model_state_dict(), tmp_path / "m.safetensors")
    fetch = Checkpoint.borrow  # what a conversion reads through
    calls = []

    def failing_fetch(self, tensor):
        calls.append(tensor)
        if len(calls) == 4:
            raise OSError("disk on fire")
        return fetch(self, tensor)

    monkeypatch.setattr(Checkpoint, "borrow", failing_fetch)
    monkeypatch.setattr(Checkpoint, "span", lambda self, leaf: None)  # every tensor fetched (none copied by the kernel)
    with pytest.raises(OSError, match="disk on fire"):
        convert(tmp_path / "m.safetensors", tmp_path / "out" / "hf", to="hf", max_shard_size=100)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.safetensors"]


# -- reading and converting -----------------------------------------------------------

SOURCES = {"dcp": "ckpt", "torch": "ckpt.pt", "safetensors": "ckpt.safetensors"}


@pytest.mark.parametrize("other", sorted(SOURCES))
def test_round_trips_between_hf_and_every_other_format(tmp_path, other):
    sd = strip_prefix("_orig_mod.")(cases.compiled(cases.combined())["model"])
    save(sd, tmp_path / SOURCES[other])
    done = convert(tmp_path / SOURCES[other], tmp_path / "hf", to="hf", max_shard_size=100)
    assert (done.src_format, done.dst_format, done.streamed) == (other, "hf", True)
    assert len(_shards(tmp_path / "hf")) == (5 if other == "dcp" else 4)  # DCP keeps no ties: head.weight is stored too
    _check_index_against_shards(tmp_path / "hf")
    assert_state_dict_equal(load(tmp_path / "hf"), sd)
    back = tmp_path / "back" / SOURCES[other]
    done = convert(tmp_path / "hf", back)
    assert (done.src_format, done.dst_format) == ("hf", other)
    loaded = load(back)
    assert_state_dict_equal(loaded, sd)
    assert list(loaded) == list(sd)
    assert diff(tmp_path / "hf", back).equal and diff(tmp_path / "hf", tmp_path / SOURCES[other]).equal


@pytest.mark.parametrize("name", ["plain", "ordered", "odd_dtypes", "empty"])
def test_tensor_corpus_round_trips_through_hf(tmp_path, name):
    sd = MODEL_STATE_DICTS[name]
    save(sd, tmp_path / "hf", format="hf", max_shard_size=8)
    loaded = load(tmp_path / "hf")
    assert_state_dict_equal(loaded, dict(sd))
    assert list(loaded) == list(sd)


def test_a_converted_hf_directory_streams_one_tensor_at_a_time(tmp_path, monkeypatch):
    save(cases.model_state_dict(), tmp_path / "src", format="hf", max_shard_size=100)
    alive, most = [], []
    fetch = Checkpoint.borrow  # what a conversion reads through

    class Memory(bytearray):
        pass

    def tracking_fetch(self, tensor):
        if self.format != "hf":  # a shard, fetched by its directory
            return fetch(self, tensor)
        most.append(sum(ref() is not None for ref in alive))
        out = fetch(self, tensor)
        memory = Memory(out.numel() * out.element_size())
        alive.append(weakref.ref(memory))
        return torch.frombuffer(memory, dtype=out.dtype).view(out.shape).copy_(out)

    monkeypatch.setattr(Checkpoint, "borrow", tracking_fetch)
    monkeypatch.setattr(Checkpoint, "span", lambda self, leaf: None)  # every tensor fetched (none copied by the kernel)
    convert(tmp_path / "src", tmp_path / "dst", to="hf", max_shard_size=100)
    assert len(most) == 6 and max(most) <= 1


def test_describe_lists_the_shards(tmp_path):
    save(cases.model_state_dict(), tmp_path / "hf", format="hf", max_shard_size=100)
    summary = describe(tmp_path / "hf")
    assert summary.format == "hf"
    names = _shards(tmp_path / "hf")
    assert summary.shards == tuple(ShardInfo(n, (tmp_path / "hf" / n).stat().st_size, t) for n, t in zip(names, [1, 1, 2, 2]))
    assert summary.to_json()["shards"][2] == {"name": names[2], "bytes": summary.shards[2].nbytes, "tensors": 2}


def test_a_hugging_face_cache_snapshot_is_read_through_its_symlinks(tmp_path):
    sd = cases.model_state_dict()
    save(sd, tmp_path / "hf", format="hf", max_shard_size=100)
    snapshot = tmp_path / "cache" / "snapshots" / "abc123"
    blobs = tmp_path / "cache" / "blobs"
    snapshot.mkdir(parents=True)
    blobs.mkdir()
    for i, file in enumerate(sorted((tmp_path / "hf").iterdir())):
        file.rename(blobs / f"blob{i}")
        (snapshot / file.name).symlink_to(os.path.join("..", "..", "blobs", f"blob{i}"))
    assert_state_dict_equal(load(snapshot), sd)


def test_an_old_directory_of_pytorch_model_bin_shards_is_read(tmp_path):
    sd = {"a.weight": torch.arange(6.0).view(2, 3), "b.weight": torch.ones(4, dtype=torch.bfloat16), "c": torch.arange(3)}
    hf = tmp_path / "hf"
    hf.mkdir()
    torch.save({"a.weight": sd["a.weight"], "c": sd["c"]}, hf / "pytorch_model-00001-of-00002.bin")
    torch.save({"b.weight": sd["b.weight"]}, hf / "pytorch_model-00002-of-00002.bin")
    weight_map = {"a.weight": "pytorch_model-00001-of-00002.bin", "c": "pytorch_model-00001-of-00002.bin", "b.weight": "pytorch_model-00002-of-00002.bin"}
    (hf / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {"total_size": 56}, "weight_map": weight_map}))
    assert detect_format(hf) == "hf"
    assert_state_dict_equal(load(hf), sd)
    (tmp_path / "single").mkdir()
    torch.save(sd, tmp_path / "single" / "pytorch_model.bin")
    assert_state_dict_equal(load(tmp_path / "single"), sd)


def test_a_directory_with_both_layouts_is_read_as_safetensors_as_transformers_does(tmp_path):
    save({"w": torch.ones(2)}, tmp_path / "hf", format="hf")
    torch.save({"w": torch.zeros(2)}, tmp_path / "hf" / "pytorch_model.bin")
    assert_state_dict_equal(load(tmp_path / "hf"), {"w": torch.ones(2)})


def test_nothing_to_write_from_hf_is_an_error(tmp_path):
    save(cases.model_state_dict(), tmp_path / "hf", format="hf")
    with pytest.raises(NothingToWriteError, match=r"drops all 7 tensors of '.*hf'"):
        convert(tmp_path / "hf", tmp_path / "out.pt", transform=select_keys("nothing."))


# -- the command line --------------------------------------------------------------


def test_cli_converts_to_hf_and_inspects_the_shards(tmp_path, capsys):
    save(cases.compiled(cases.combined()), tmp_path / "dcp")
    status, out, _ = run(capsys, "convert", tmp_path / "dcp", tmp_path / "hf", "--to", "hf", "--model-only", "--max-shard-size", "100", "--strip-prefix", "_orig_mod.")
    assert status == 0 and "(hf)" in out
    _check_index_against_shards(tmp_path / "hf")
    status, out, _ = run(capsys, "inspect", tmp_path / "hf")
    assert status == 0 and out.startswith(f"{tmp_path / 'hf'} (hf)")
    assert "shards: 5" in out and "model-00003-of-00005.safetensors  276 B  2" in out  # DCP keeps no ties
    status, out, _ = run(capsys, "diff", tmp_path / "hf", tmp_path / "dcp")
    assert status == 1 and "missing" in out  # the DCP keys carry model. and _orig_mod.


@pytest.mark.parametrize(
    "argv, words",
    [
        (["--to", "hf", "--max-shard-size", "5XB"], ["max_shard_size='5XB' (--max-shard-size) is not a size"]),
        (["--max-shard-size", "5GB"], ["sets the shard size of a Hugging Face directory", "destination format is 'dcp'"]),
        (["--to", "hf"], ["holds a model state dict only", "--model-only"]),
    ],
)
def test_cli_hf_errors_are_one_line(tmp_path, capsys, argv, words):
    save(cases.combined(), tmp_path / "ckpt.pt")
    status, out, err = run(capsys, "convert", tmp_path / "ckpt.pt", tmp_path / "out", *argv)
    assert_one_error_line(status, out, err, *words)
    assert not (tmp_path / "out").exists()


# -- transformers ------------------------------------------------------------------


@pytest.fixture(scope="module")
def llama():
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(
        vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    return transformers, config, transformers.LlamaForCausalLM(config).eval()


def test_a_directory_written_by_save_pretrained_reads_as_its_state_dict(tmp_path, llama):
    _, _, model = llama
    model.save_pretrained(tmp_path / "hf", max_shard_size="5KB")
    assert len(_shards(tmp_path / "hf")) > 3  # config.json and generation_config.json among them
    expected = {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}  # dropped: tied
    loaded = load(tmp_path / "hf")
    assert_state_dict_equal(loaded, expected)
    assert describe(tmp_path / "hf").stored_bytes == json.loads((tmp_path / "hf" / INDEX).read_text())["metadata"]["total_size"]


def test_a_directory_of_bin_shards_as_transformers_4_wrote_them_reads(tmp_path, llama):
    from huggingface_hub import split_torch_state_dict_into_shards

    _, _, model = llama
    sd = model.state_dict()
    split = split_torch_state_dict_into_shards(sd, filename_pattern="pytorch_model{suffix}.bin", max_shard_size="5KB")
    (tmp_path / "hf").mkdir()
    for name, keys in split.filename_to_tensors.items():
        torch.save({k: sd[k] for k in keys}, tmp_path / "hf" / name)
    index = {"metadata": split.metadata, "weight_map": split.tensor_to_filename}
    (tmp_path / "hf" / "pytorch_model.bin.index.json").write_text(json.dumps(index, indent=2))
    loaded = load(tmp_path / "hf")
    assert_state_dict_equal(loaded, dict(sd))
    assert loaded["lm_head.weight"] is loaded["model.embed_tokens.weight"]  # one storage in its shard


def test_sdtree_output_loads_in_from_pretrained_with_identical_logits(tmp_path, llama, capsys):
    transformers, config, model = llama
    save(dict(model.state_dict()), tmp_path / "sd.pt")  # lm_head.weight tied to embed_tokens
    status, _, _ = run(capsys, "convert", tmp_path / "sd.pt", tmp_path / "hf", "--to", "hf", "--max-shard-size", "4KB")
    assert status == 0
    index = _check_index_against_shards(tmp_path / "hf")
    assert "lm_head.weight" not in index["weight_map"] and len(set(index["weight_map"].values())) > 3
    config.save_pretrained(tmp_path / "hf")
    again = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert again.lm_head.weight is again.model.embed_tokens.weight  # re-tied from the config
    tokens = torch.tensor([[1, 5, 9, 2, 63]])
    with torch.no_grad():
        assert torch.equal(again(tokens).logits, model(tokens).logits)
    assert_state_dict_equal(load(tmp_path / "hf"), dict(model.state_dict()))
