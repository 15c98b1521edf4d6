"""The real commands, run as a user runs them: ``python -m sdtree`` and the
``sdtree`` console script (installed by ``pip install -e .``).

Starting Python with torch costs seconds, so the commands of this module
start together, once, and each test checks one of them.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import sdtree
from sdtree.checkpoint import describe, load, save
from sdtree.testing import assert_state_dict_equal
from tests.checkpoint import cases
from tests.checkpoint.cases import Payload

REPO = Path(__file__).resolve().parents[2]
CONSOLE_SCRIPT = Path(sys.executable).parent / "sdtree"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cli")
    checkpoint = cases.compiled(cases.combined())
    save(checkpoint, tmp / "dcp")
    save({**checkpoint, "step": 9}, tmp / "other.pt")
    torch.save({"x": Payload(tmp / "code-ran")}, tmp / "evil.pt")
    # a dry run prints a line per key: far more than a pipe holds
    torch.save({f"layers.{i}.self_attn.q_proj.weight": torch.zeros(1) for i in range(4000)}, tmp / "many.pt")
    save(checkpoint["model"], tmp / "stale-hf", format="hf", max_shard_size=100)
    (tmp / "stale-hf" / "model-00009-of-00009.safetensors").write_bytes(b"")  # left from another save
    module = [sys.executable, "-m", "sdtree"]
    commands = {
        "inspect": module + ["inspect", tmp / "dcp", "--json"],
        "diff": module + ["diff", tmp / "dcp", tmp / "other.pt"],
        "unsafe": module + ["convert", tmp / "evil.pt", tmp / "out.pt"],
        "version": module + ["--version"],
        "demo help": module + ["demo", "--help"],
        "head": module + ["convert", tmp / "many.pt", tmp / "never.pt", "--dry-run"],
        "hf": module + ["convert", tmp / "dcp", tmp / "hf", "--to", "hf", "--model-only", "--strip-prefix", "_orig_mod.", "--max-shard-size", "0.1kB"],
        "hf stale": module + ["inspect", tmp / "stale-hf"],
    }
    if CONSOLE_SCRIPT.exists():
        commands["script"] = [CONSOLE_SCRIPT, "convert", tmp / "dcp", tmp / "m.safetensors", "--model-only", "--strip-prefix", "_orig_mod."]
    procs = {
        name: subprocess.Popen([str(a) for a in argv], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for name, argv in commands.items()
    }
    first_line = procs["head"].stdout.readline()  # like `| head -1`: read one line, close the pipe
    procs["head"].stdout.close()
    done = {name: (proc.wait(timeout=240), "" if proc.stdout.closed else proc.stdout.read(), proc.stderr.read()) for name, proc in procs.items()}
    done["head"] = (done["head"][0], first_line, done["head"][2])
    for proc in procs.values():
        proc.stdout.close()
        proc.stderr.close()
    return tmp, done


def test_python_m_sdtree_inspect_prints_json(runs):
    tmp, done = runs
    status, out, err = done["inspect"]
    assert status == 0, err
    assert json.loads(out) == json.loads(json.dumps(describe(tmp / "dcp").to_json()))


def test_diff_exits_1_when_checkpoints_differ(runs):
    status, out, _ = runs[1]["diff"]
    assert status == 1 and "value       step: 3 vs 9" in out


def test_unsafe_pickle_exits_2_with_one_line_and_runs_nothing(runs):
    tmp, done = runs
    status, out, err = done["unsafe"]
    assert status == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith("sdtree: error: ") and "--trust-pickle" in err
    assert not (tmp / "code-ran").exists() and not (tmp / "out.pt").exists()


def test_console_script_converts(runs):
    tmp, done = runs
    if "script" not in done:
        pytest.skip(f"no console script at {CONSOLE_SCRIPT}: run `pip install -e .`")
    status, out, err = done["script"]
    assert status == 0 and out.startswith("wrote "), err
    assert_state_dict_equal(load(tmp / "m.safetensors"), cases.combined()["model"])


def test_version(runs):
    assert runs[1]["version"] == (0, f"sdtree {sdtree.__version__}\n", "")


def test_demo_help_names_the_command(runs):
    status, out, err = runs[1]["demo help"]
    assert status == 0 and out.startswith("usage: sdtree demo [-h] [--steps STEPS]"), err


def test_a_closed_output_pipe_ends_quietly(runs):
    status, first_line, err = runs[1]["head"]
    assert first_line == "layers.0.self_attn.q_proj.weight -> layers.0.self_attn.q_proj.weight  [1] float32\n"
    assert (status, err) == (141, "")  # 128 + SIGPIPE, as a shell reports for `yes | head`; no traceback
    assert not (runs[0] / "never.pt").exists()


def test_convert_to_hf_writes_shards_by_size(runs):
    tmp, done = runs
    status, out, err = done["hf"]
    assert status == 0 and out.startswith(f"wrote {tmp / 'hf'} (hf) from {tmp / 'dcp'} (dcp): 7 tensors"), err
    assert sorted(p.name for p in (tmp / "hf").iterdir()) == [f"model-0000{i}-of-00005.safetensors" for i in range(1, 6)] + ["model.safetensors.index.json"]
    assert_state_dict_equal(load(tmp / "hf"), cases.combined()["model"])


def test_a_stray_hf_shard_exits_2_with_one_line(runs):
    tmp, done = runs
    status, out, err = done["hf stale"]
    assert status == 2 and out == "" and err.count("\n") == 1, err
    assert err.startswith("sdtree: error: Hugging Face checkpoint ") and "'model-00009-of-00009.safetensors' is named like a shard of this checkpoint" in err
