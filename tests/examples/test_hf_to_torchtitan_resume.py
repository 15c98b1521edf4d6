"""examples/hf_to_torchtitan_resume.py: train in Hugging Face's layout, convert
model + AdamW to torchtitan's, resume there with the uninterrupted run's losses.

The good conversion runs as users run it, in a subprocess from the repository
root; the deliberately broken ones run in this process (transformers imports
once), and must fail the check.
"""

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "examples" / "hf_to_torchtitan_resume.py"


@pytest.fixture(scope="module")
def script():
    spec = importlib.util.spec_from_file_location("hf_to_torchtitan_resume", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _rows(stdout):
    """The table's rows after the checkpoint: (step, uninterrupted, resumed, |diff|)."""
    rows = [line.split() for line in stdout.splitlines()]
    return [(int(r[0]), *map(float, r[1:])) for r in rows if len(r) == 4 and r[0].isdigit()]


def test_resumed_run_in_torchtitan_layout_matches_uninterrupted_run(tmp_path):
    cmd = [sys.executable, str(SCRIPT.relative_to(ROOT)), "--steps", "8", "--resume-at", "4", "--out", str(tmp_path)]
    proc = subprocess.run(cmd, check=False, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[-1].startswith(
        "match: the run resumed in torchtitan's layout has the uninterrupted run's losses at all 4 steps after the conversion"
    )
    rows = _rows(proc.stdout)
    assert [row[0] for row in rows] == [4, 5, 6, 7]
    assert all(abs(a - b) <= 5e-6 for _, a, b, _ in rows)
    assert rows[-1][1] < rows[0][1]  # it learns
    # the plan printed: the fused projection and its moments, each from q, k, v through the rotary permutation
    assert "  model.layers.0.attention.wqkv.weight (128, 64) <- q_proj, k_proj, v_proj by unpermute_for_rope >> fuse" in lines
    assert any(line.startswith("  optim.state.layers.0.attention.wqkv.weight.exp_avg_sq (128, 64) <- q_proj") for line in lines)
    assert (tmp_path / "hf_step_4" / ".metadata").is_file() and (tmp_path / "torchtitan_step_4" / ".metadata").is_file()
    assert "Warning" not in proc.stderr, proc.stderr


@pytest.mark.parametrize("how", ["unpermuted", "fresh"])
def test_a_broken_optimizer_conversion_fails_the_check(script, tmp_path, capsys, how):
    assert script.main(["--steps", "6", "--resume-at", "3", "--out", str(tmp_path), "--break-optimizer", how]) == 1
    out = capsys.readouterr().out
    assert out.splitlines()[-1].startswith("MISMATCH: losses differ by up to ")
    assert out.splitlines()[-1].endswith("> 5e-06, first at step 4")  # step 3 runs on the loaded weights: still equal
    assert min(diff for step, _, _, diff in _rows(out) if step > 3) > 20 * script.TOLERANCE


def test_verdict_names_the_first_step_that_differs(script):
    full = [5.0, 4.0, 3.0, 2.0]
    assert script.verdict(full, [3.0, 2.0 + 1e-6], resume_at=2)[0]
    ok, line = script.verdict(full, [3.0, 2.5], resume_at=2)
    assert (ok, line) == (False, "MISMATCH: losses differ by up to 5.0e-01 > 5e-06, first at step 3")
    ok, line = script.verdict(full, [3.0], resume_at=2)
    assert (ok, line) == (False, "MISMATCH: the resumed run ran 1 of 2 steps")
