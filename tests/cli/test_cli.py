"""The command line, called in this process through ``sdtree.cli.main``.

``test_subprocess.py`` runs the installed commands for real.
"""

import json
import os
import sys
from pathlib import Path

import pytest
import torch

from sdtree import cli
from sdtree.checkpoint import load, save
from sdtree.testing import assert_state_dict_equal
from tests.checkpoint import cases
from tests.checkpoint.cases import Payload


@pytest.fixture
def ckpts(tmp_path):
    checkpoint = cases.compiled(cases.combined())
    save(checkpoint, tmp_path / "dcp")
    save(checkpoint, tmp_path / "full.pt")
    save(checkpoint["model"], tmp_path / "model.safetensors")
    return tmp_path


def run(capsys, *argv):
    status = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return status, out, err


def assert_one_error_line(status, out, err, *words):
    assert status == 2 and out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("sdtree: error: "), err
    assert "Traceback" not in err
    for word in words:
        assert word in lines[0], (word, lines[0])


@pytest.mark.parametrize("name", ["dcp", "full.pt", "model.safetensors"])
def test_inspect_prints_a_table_with_totals(ckpts, capsys, name):
    status, out, _ = run(capsys, "inspect", ckpts / name)
    assert status == 0
    assert "key" in out and "shape" in out and "dtype" in out and "bytes" in out
    assert "_orig_mod.mlp.0.weight" in out and "[5, 4]" in out and "bfloat16" in out
    assert "total: " in out
    if name != "model.safetensors":
        assert "param group optim.param_groups.1: 4 params; lr=0.02" in out
        assert "value step = 3" in out
    else:
        assert "tied to _orig_mod.embed.weight" in out


def test_inspect_json(ckpts, capsys):
    status, out, _ = run(capsys, "inspect", ckpts / "dcp", "--json")
    report = json.loads(out)
    assert status == 0 and report["format"] == "dcp"
    assert {"key": "model._orig_mod.mlp.0.bias", "shape": [5], "dtype": "float32", "bytes": 20, "tied_to": None} in report["tensors"]
    assert report["param_groups"][0]["hyper"]["lr"] == 0.01


def test_diff_exit_status(ckpts, capsys):
    status, out, _ = run(capsys, "diff", ckpts / "dcp", ckpts / "full.pt")
    assert status == 0 and out.startswith("equal: ")
    other = {**cases.compiled(cases.combined()), "step": 4}
    save(other, ckpts / "other.pt")
    status, out, _ = run(capsys, "diff", ckpts / "dcp", ckpts / "other.pt")
    assert status == 1 and "value       step: 3 vs 4" in out and "1 difference(s)" in out


def test_diff_tolerances(tmp_path, capsys):
    save({"w": torch.tensor([1.0])}, tmp_path / "a.pt")
    save({"w": torch.tensor([1.001])}, tmp_path / "b.pt")
    assert run(capsys, "diff", tmp_path / "a.pt", tmp_path / "b.pt")[0] == 1
    assert run(capsys, "diff", tmp_path / "a.pt", tmp_path / "b.pt", "--atol", "0.01")[0] == 0
    assert run(capsys, "diff", tmp_path / "a.pt", tmp_path / "b.pt", "--rtol", "0.01")[0] == 0


@pytest.mark.parametrize("value", ["-1", "nan", "inf"])
def test_diff_refuses_a_tolerance_that_is_no_finite_number_at_least_zero(tmp_path, capsys, value):
    save({"w": torch.tensor([1.0])}, tmp_path / "a.pt")
    status, out, err = run(capsys, "diff", tmp_path / "a.pt", tmp_path / "a.pt", "--atol", value)
    assert_one_error_line(status, out, err, "atol (--atol) must be a finite number >= 0 (0: exact), not")


def test_diff_of_empty_checkpoints_exits_2_saying_nothing_was_compared(tmp_path, capsys):
    torch.save({}, tmp_path / "a.pt")
    status, out, err = run(capsys, "diff", tmp_path / "a.pt", tmp_path / "a.pt")
    assert_one_error_line(status, out, err, "holds an entry, so nothing was compared: they are empty, not equal")


def test_convert_applies_key_options_in_order(ckpts, capsys):
    status, out, err = run(
        capsys, "convert", ckpts / "dcp", ckpts / "out.safetensors", "--model-only",
        "--strip-prefix", "_orig_mod.", "--rename", r"^mlp\.(\d+)\.", r"ffn.\1.", "--add-prefix", "net.",
    )
    assert status == 0 and out.startswith("wrote ") and err == ""
    expected = {f"net.{k.replace('mlp.', 'ffn.')}": v for k, v in cases.combined()["model"].items()}
    assert_state_dict_equal(load(ckpts / "out.safetensors"), expected)


@pytest.mark.parametrize("dst", ["out-dcp", "out.safetensors"])
def test_convert_no_sync_writes_without_flushing_to_the_disk(ckpts, capsys, monkeypatch, dst):
    synced = []
    fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: synced.append(fd) or fsync(fd))
    assert run(capsys, "convert", ckpts / "model.safetensors", ckpts / dst, "--no-sync")[0] == 0
    assert synced == []
    assert_state_dict_equal(load(ckpts / dst), cases.compiled(cases.combined())["model"])
    assert run(capsys, "convert", ckpts / "model.safetensors", ckpts / ("synced-" + dst))[0] == 0
    assert len(synced) >= 2  # by default: the files, and the directory that holds them


def test_convert_to_and_force(ckpts, capsys):
    assert run(capsys, "convert", ckpts / "model.safetensors", ckpts / "out", "--to", "torch")[0] == 0
    assert_state_dict_equal(torch.load(ckpts / "out", weights_only=True), cases.compiled(cases.combined())["model"])
    status, out, err = run(capsys, "convert", ckpts / "full.pt", ckpts / "out")
    assert_one_error_line(status, out, err, "already exists", "--force")
    assert run(capsys, "convert", ckpts / "full.pt", ckpts / "out", "--force")[0] == 0
    assert_state_dict_equal(load(ckpts / "out"), cases.compiled(cases.combined()))


def test_convert_dry_run_prints_the_key_mapping(ckpts, capsys):
    status, out, _ = run(capsys, "convert", ckpts / "full.pt", ckpts / "new", "--strip-prefix", "_orig_mod.", "--dry-run")
    assert status == 0
    lines = out.splitlines()
    assert "model._orig_mod.mlp.0.weight -> model.mlp.0.weight  [5, 4] float32" in lines
    assert "optim.state._orig_mod.mlp.0.weight.exp_avg -> optim.state.mlp.0.weight.exp_avg  [5, 4] float32" in lines
    assert "; peak memory about " in lines[-1]
    assert lines[-1].startswith("dry run: would write ") and "strip_prefix('_orig_mod.', strict=False)" in lines[-1]
    assert not (ckpts / "new").exists()


def test_convert_progress_bar_only_when_asked_or_on_a_terminal(ckpts, capsys):
    _, _, err = run(capsys, "convert", ckpts / "dcp", ckpts / "a.pt")
    assert err == ""  # stderr is not a terminal here
    _, _, err = run(capsys, "convert", ckpts / "dcp", ckpts / "b.pt", "--progress")
    assert "convert: 100%" in err


def test_bad_input_exits_2_with_one_line(ckpts, capsys, tmp_path):
    (tmp_path / "notes.txt").write_text("not a checkpoint")
    truncated = (ckpts / "full.pt").read_bytes()[:300]
    (tmp_path / "cut.pt").write_bytes(truncated)
    cases_ = {
        "missing": (["inspect", tmp_path / "nope.pt"], ["no checkpoint at"]),
        "corrupt": (["inspect", tmp_path / "cut.pt"], ["is corrupt or truncated"]),
        "unknown format": (["diff", tmp_path / "notes.txt", ckpts / "full.pt"], ["is not a checkpoint sdtree knows"]),
        "collision": (["convert", ckpts / "full.pt", tmp_path / "x.pt", "--rename", r"\.(weight|bias)$", ".p"], ["both map to"]),
        "optimizer in safetensors": (["convert", ckpts / "full.pt", tmp_path / "x.safetensors"], ["--model-only"]),
        "bad regex": (["convert", ckpts / "full.pt", tmp_path / "x.pt", "--rename", "(", "x"], ["not a valid regular expression"]),
        "bad group reference": (
            ["convert", ckpts / "full.pt", tmp_path / "x.pt", "--rename", "model", r"\2"],
            [r"rename: rule ('model', '\\2'): the replacement is invalid", "invalid group reference 2"],
        ),
    }
    for name, (argv, words) in cases_.items():
        status, out, err = run(capsys, *argv)
        assert_one_error_line(status, out, err, *words)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["cut.pt", "notes.txt", "dcp", "full.pt", "model.safetensors"])


def test_convert_that_leaves_nothing_to_write_exits_2(tmp_path, capsys):
    save(cases.model_state_dict(), tmp_path / "plain.pt")
    save({"step": 3}, tmp_path / "step.pt")
    for argv, words in [
        (["convert", tmp_path / "plain.pt", tmp_path / "m.safetensors", "--model-only"], ["(--model-only)", "has no 'model' state dict"]),
        (["convert", tmp_path / "step.pt", tmp_path / "out"], ["step.pt' holds no tensor (only 'step'): nothing to write"]),
    ]:
        assert_one_error_line(*run(capsys, *argv), *words)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plain.pt", "step.pt"]


def test_diff_shows_keys_that_differ_only_in_type(tmp_path, capsys):
    save({"state": {0: {"m": torch.ones(2)}}}, tmp_path / "int.pt")
    save({"state": {"0": {"m": torch.ones(2)}}}, tmp_path / "str.pt")
    status, out, _ = run(capsys, "diff", tmp_path / "int.pt", tmp_path / "str.pt")
    assert status == 1
    assert "key         state.0.m: A has ['state'][0]['m'], B has ['state']['0']['m']: key 0 (int) vs '0' (str)" in out.splitlines()


def test_missing_shard_exits_2(ckpts, capsys):
    (ckpts / "dcp" / "__0_0.distcp").unlink()
    status, out, err = run(capsys, "convert", ckpts / "dcp", ckpts / "x.pt")
    assert_one_error_line(status, out, err, "__0_0.distcp", "missing")
    assert not (ckpts / "x.pt").exists()


def test_pickle_that_runs_code_needs_trust_pickle(tmp_path, capsys):
    marker = tmp_path / "code-ran"
    torch.save({"x": Payload(marker)}, tmp_path / "evil.pt")
    for argv in (["inspect", tmp_path / "evil.pt"], ["convert", tmp_path / "evil.pt", tmp_path / "x"]):
        status, out, err = run(capsys, *argv)
        assert_one_error_line(status, out, err, "--trust-pickle")
    assert not marker.exists() and not (tmp_path / "x").exists()
    assert run(capsys, "inspect", tmp_path / "evil.pt", "--trust-pickle")[0] == 0
    assert marker.exists()


def test_usage_errors_exit_2(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["convert", "a", "b", "--to", "npz"])
    assert exit_.value.code == 2 and "invalid choice: 'npz'" in capsys.readouterr().err


def test_demo_runs_the_trainer_with_the_arguments_and_its_status(tmp_path, monkeypatch, capfd):
    script = tmp_path / "train_resume.py"
    script.write_text("import sys\nprint('args', sys.argv[1:], sys.executable)\nsys.exit(3)\n")
    monkeypatch.setattr(cli, "demo_script", lambda: script)
    assert cli.main(["demo", "--steps", "2", "--quiet"]) == 3
    assert capfd.readouterr().out == f"args ['--steps', '2', '--quiet'] {sys.executable}\n"


def test_demo_without_the_trainer_exits_2(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(cli, "demo_script", lambda: tmp_path / "examples" / "train_resume.py")
    status, out, err = run(capsys, "demo")
    assert_one_error_line(status, out, err, "demo", "train_resume.py", "is missing")


def test_demo_script_is_found_in_the_repository():
    assert cli.demo_script() == Path(__file__).resolve().parents[2] / "examples" / "train_resume.py"


@pytest.mark.parametrize(
    "option, shown",
    [
        (["--strip-prefix", "module."], "--strip-prefix 'module.' changes no key"),
        (["--strip-prefix", "_orig_mod.", "--strip-prefix", "_orig_mod."], "--strip-prefix '_orig_mod.' changes no key"),
        (["--rename", "^encoder\\.", "enc."], "--rename '^encoder\\\\.' 'enc.' changes no key"),
    ],
)
def test_a_key_option_that_changes_no_key_exits_2(ckpts, capsys, option, shown):
    status, out, err = run(capsys, "convert", ckpts / "full.pt", ckpts / "nothing.pt", *option)
    assert_one_error_line(status, out, err, shown, "sdtree inspect")
    assert "(its keys look like model." in err  # what the keys look like instead
    assert not (ckpts / "nothing.pt").exists()


def test_select_drop_and_dtype_apply_in_order(ckpts, capsys):
    out_path = ckpts / "small.pt"
    status, _, err = run(
        capsys, "convert", ckpts / "full.pt", out_path, "--strip-prefix", "_orig_mod.", "--select", "mlp.", "--drop", "mlp.2.", "--dtype", "bfloat16"
    )
    assert status == 0, err
    got = load(out_path)
    assert list(got["model"]) == ["mlp.0.weight", "mlp.0.bias"]
    assert all(v.dtype == torch.bfloat16 for v in got["model"].values())
    assert list(got["optim"]["state"]) == ["mlp.0.weight", "mlp.0.bias"]
    assert got["optim"]["state"]["mlp.0.weight"]["exp_avg"].dtype == torch.bfloat16  # moments follow


def test_key_takes_a_subtree_of_a_trainers_checkpoint(tmp_path, capsys):
    model = {"w": torch.ones(2), "b": torch.zeros(1)}
    torch.save({"state_dict": model, "epoch": 3, "hparams": {"lr": 0.1}}, tmp_path / "trainer.pt")
    assert run(capsys, "convert", tmp_path / "trainer.pt", tmp_path / "m.safetensors", "--key", "state_dict")[0] == 0
    assert_state_dict_equal(load(tmp_path / "m.safetensors"), model)
    status, out, err = run(capsys, "convert", tmp_path / "trainer.pt", tmp_path / "x.safetensors", "--key", "state_dict.model")
    assert_one_error_line(status, out, err, "key='state_dict.model': 'state_dict' has no entry 'model' (its entries are 'w', 'b')")


USER_RULES = '''
import torch
from sdtree.transforms import add_prefix, cast, strip_prefix

clean = strip_prefix("_orig_mod.", strict=False) >> add_prefix("net.")
not_a_transform = {"a": 1}

def recipe():
    return cast(torch.float64)

def needs_args(n_heads):
    return add_prefix("x.")
'''


def test_transform_from_a_users_file(ckpts, capsys):
    rules = ckpts / "rules.py"
    rules.write_text(USER_RULES)
    assert run(capsys, "convert", ckpts / "model.safetensors", ckpts / "a.safetensors", "--transform", f"{rules}:clean")[0] == 0
    assert list(load(ckpts / "a.safetensors"))[0] == "net.scale"
    assert run(capsys, "convert", ckpts / "model.safetensors", ckpts / "b.safetensors", "--transform", f"{rules}:recipe")[0] == 0
    assert {v.dtype for v in load(ckpts / "b.safetensors").values()} == {torch.float64}


@pytest.mark.parametrize(
    "spec, words",
    [
        ("{rules}:missing", ["defines no 'missing'", "the Transforms it defines are clean"]),
        ("{rules}:not_a_transform", ["not_a_transform is dict", "not an sdtree Transform"]),
        ("{rules}:needs_args", ["needs_args is a function that cannot be called without arguments"]),
        ("{dir}/nowhere.py:clean", ["there is no file"]),
        ("{rules}", ["expected FILE.py:NAME"]),
        ("{broken}:clean", ["raised ZeroDivisionError"]),
    ],
)
def test_bad_transform_option_exits_2(ckpts, capsys, spec, words):
    (ckpts / "rules.py").write_text(USER_RULES)
    (ckpts / "broken.py").write_text("1 / 0\n")
    spec = spec.format(rules=ckpts / "rules.py", broken=ckpts / "broken.py", dir=ckpts)
    status, out, err = run(capsys, "convert", ckpts / "model.safetensors", ckpts / "c.safetensors", "--transform", spec)
    assert_one_error_line(status, out, err, "--transform", *words)
    assert not (ckpts / "c.safetensors").exists()


def test_bad_dtype_and_a_drop_that_drops_nothing_exit_2(ckpts, capsys):
    status, out, err = run(capsys, "convert", ckpts / "model.safetensors", ckpts / "d.pt", "--dtype", "int8")
    assert_one_error_line(status, out, err, "--dtype 'int8' is not a floating-point torch dtype", "bfloat16")
    status, out, err = run(capsys, "convert", ckpts / "model.safetensors", ckpts / "d.pt", "--drop", "decoder.")
    assert_one_error_line(status, out, err, "--drop 'decoder.' changes no key")


def _tiny_llama_state_dict():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    return {k: v.detach().clone() for k, v in LlamaForCausalLM(config).state_dict().items()}


def test_recipe_converts_to_torchtitan_and_back(tmp_path, capsys):
    from sdtree.recipes import llama

    model = _tiny_llama_state_dict()
    save(model, tmp_path / "hf.safetensors")
    shape = ["--n-heads", "4", "--n-kv-heads", "2", "--dim", "32"]
    status, _, err = run(capsys, "convert", tmp_path / "hf.safetensors", tmp_path / "titan.pt", "--recipe", "llama-hf-to-torchtitan", *shape, "--fuse-qkv", "--fuse-w13")
    assert status == 0, err
    expected = llama.hf_to_torchtitan(n_heads=4, n_kv_heads=2, dim=32, fuse_qkv=True, fuse_w13=True)(model)
    titan = load(tmp_path / "titan.pt")
    assert list(titan) == list(expected) and "layers.0.attention.wqkv.weight" in titan
    assert_state_dict_equal(titan, expected)
    status, _, err = run(capsys, "convert", tmp_path / "titan.pt", tmp_path / "back.safetensors", "--recipe", "llama-torchtitan-to-hf", *shape, "--fuse-qkv", "--fuse-w13")
    assert status == 0, err
    assert_state_dict_equal(load(tmp_path / "back.safetensors"), model)


@pytest.mark.parametrize(
    "extra, words",
    [
        (["--n-heads", "4", "--dim", "32"], ["--recipe llama-hf-to-torchtitan: give the model's shape: --n-kv-heads"]),
        (["--n-heads", "3", "--n-kv-heads", "3", "--dim", "32"], ["dim=32 does not divide by n_heads=3"]),
        (["--n-heads", "8", "--n-kv-heads", "2", "--dim", "32"], ["'layers.0.attention.wk.weight' (16, 32)", "not n_heads=2 x head_dim=4"]),
    ],
)
def test_a_recipe_with_a_wrong_shape_exits_2_naming_the_option_or_key(tmp_path, capsys, extra, words):
    save(_tiny_llama_state_dict(), tmp_path / "hf.safetensors")
    status, out, err = run(capsys, "convert", tmp_path / "hf.safetensors", tmp_path / "t.pt", "--recipe", "llama-hf-to-torchtitan", *extra)
    assert_one_error_line(status, out, err, *words)
    assert not (tmp_path / "t.pt").exists()


def test_dry_run_prints_the_plan_of_a_recipe_without_reading_data(tmp_path, capsys, monkeypatch):
    from sdtree.checkpoint import Checkpoint

    save(_tiny_llama_state_dict(), tmp_path / "hf.safetensors")
    monkeypatch.setattr(Checkpoint, "fetch", lambda self, t: pytest.fail("a dry run read tensor data"))
    monkeypatch.setattr(Checkpoint, "borrow", lambda self, t: pytest.fail("a dry run read tensor data"))
    status, out, err = run(
        capsys, "convert", tmp_path / "hf.safetensors", tmp_path / "t.pt", "--recipe", "llama-hf-to-torchtitan",
        "--n-heads", "4", "--n-kv-heads", "2", "--dim", "32", "--fuse-qkv", "--dry-run",
    )
    assert status == 0, err
    lines = out.splitlines()
    assert (
        "layers.0.attention.wqkv.weight  [64, 32] float32  <- unpermute_for_rope >> fuse of "
        "model.layers.0.self_attn.q_proj.weight, model.layers.0.self_attn.k_proj.weight, model.layers.0.self_attn.v_proj.weight"
    ) in lines, out
    assert "model.layers.0.mlp.gate_proj.weight -> layers.0.feed_forward.w1.weight  [48, 32] float32" in lines
    # the largest group: q's and k's permuted copies (32x32, 16x32) and the fused output (64x32), float32;
    # q, k and v themselves are mapped from the safetensors file, not read into memory
    assert lines[-1].startswith(f"dry run: would write {tmp_path / 't.pt'} (torch): 17 tensors, 76.6 KiB")
    assert "; peak memory about 14.0 KiB (largest: layers.0.attention.wqkv.weight)" in lines[-1]
    assert not (tmp_path / "t.pt").exists()
