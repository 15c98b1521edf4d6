"""examples/train_resume.py: stop an FSDP2 run, resume it at another world size, same losses.

The script starts its own gloo processes; here it runs as users run it, in a
subprocess from the repository root, on a few steps.
"""

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
BLOCKED = (
    r"checkpoint after (?P<step>\d+) steps: training blocked (?P<async_ms>[\d.]+) ms by dcp.async_save "
    r"through sdtree.Stager, (?P<sync_ms>[\d.]+) ms by dcp.save"
)
SCRIPT = ROOT / "examples" / "train_resume.py"


def _load_script():
    spec = importlib.util.spec_from_file_location("train_resume", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


def test_resumed_run_at_world_size_1_matches_uninterrupted_run(tmp_path):
    cmd = [sys.executable, str(SCRIPT.relative_to(ROOT)), "--steps", "6", "--resume-at", "3", "--checkpoint-every", "2"]
    cmd += ["--out", str(tmp_path)]
    proc = subprocess.run(cmd + ["--no-plot"], check=False, cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[-1].startswith("match: the run resumed at world size 1 has the uninterrupted run's losses at all 6")
    assert "-- checkpoint after step 2; resumed at world size 1 --" in [line.strip() for line in lines]
    rows = [line.split() for line in lines if line.split() and line.split()[0].isdigit()]
    assert [int(row[0]) for row in rows] == list(range(6))
    assert all(abs(float(row[1]) - float(row[2])) <= 1e-5 for row in rows)
    assert float(rows[-1][1]) < float(rows[0][1])  # it learns
    assert (tmp_path / "step_3" / ".metadata").is_file()
    # checkpoints after 2 and 3 steps, each through the stager and (measured, then removed) with dcp.save
    blocked = [re.fullmatch(BLOCKED, line) for line in lines if line.startswith("checkpoint after ")]
    assert [int(m["step"]) for m in blocked if m] == [2, 3], lines
    assert all(float(m["async_ms"]) >= 0 and float(m["sync_ms"]) > 0 for m in blocked)
    assert (tmp_path / "step_2" / ".metadata").is_file()
    assert not list(tmp_path.glob("sync_step_*"))
    assert not (tmp_path / "losses.png").exists()
    assert "Warning" not in proc.stderr, proc.stderr


def test_verdict_names_the_first_step_that_differs():
    script = _load_script()
    cfg = script.Config(steps=3, resume_at=1, checkpoint="unused")
    res = script.Results(cfg, 2, 1, full=[3.0, 2.0, 1.0], split=[3.0, 2.0, 1.5], seconds={})
    assert not res.matches()
    assert script.verdict(res) == "MISMATCH: losses differ by up to 5.0e-01 > 1e-05, first at step 2"
    short = script.Results(cfg, 2, 1, full=[3.0, 2.0, 1.0], split=[3.0, 2.0], seconds={})
    assert not short.matches()
    assert script.verdict(short).startswith("MISMATCH: the stopped and resumed runs ran 2 of 3 steps")
    same = script.Results(cfg, 2, 1, full=[3.0, 2.0, 1.0], split=[3.0, 2.0, 1.0 + 1e-6], seconds={})
    assert script.verdict(same).startswith("match: ")
