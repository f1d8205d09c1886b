"""Kill a DP run mid-epoch, resume in a fresh process: nothing about privacy is forgotten."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import torch

SCRIPT = Path(__file__).with_name("resume_run.py")
KILL_AT = 11  # mid-way through the second epoch


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=300)


def test_killed_and_resumed_run_equals_an_uninterrupted_one(tmp_path):
    full = _run(str(tmp_path / "full.pt"), "full")
    assert full.returncode == 0, full.stderr[-3000:]
    killed = _run(str(tmp_path / "killed.pt"), "killed", str(tmp_path / "ckpt"), str(KILL_AT))
    assert killed.returncode == 3, killed.stderr[-3000:]
    assert not (tmp_path / "killed.pt").exists()
    checkpoint = next(p for p in (tmp_path / "ckpt").iterdir() if f"step={KILL_AT}." in p.name)
    resumed = _run(str(tmp_path / "resumed.pt"), "resume", str(checkpoint))
    assert resumed.returncode == 0, resumed.stderr[-3000:]

    want = torch.load(tmp_path / "full.pt", weights_only=True)
    got = torch.load(tmp_path / "resumed.pt", weights_only=True)
    assert got["sigma"] == want["sigma"]  # restored, not recalibrated
    assert got["steps"] == want["steps"] == got["global_step"] == want["global_step"] == 20
    assert got["epsilon"] == want["epsilon"] and got["logged_epsilon"] == want["logged_epsilon"]
    assert got["seen"] == want["seen"][KILL_AT:]  # the same Poisson batches, from the right one
    torch.testing.assert_close(got["params"], want["params"], rtol=0, atol=0)
