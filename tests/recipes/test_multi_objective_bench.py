"""bench/multi_objective.py end to end on a tiny model (slow: three short training runs)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_bench_prints_every_arm_and_the_ratio(tmp_path):
    arms = ["static_uniform", "hypervolume", "gradient"]
    cmd = [sys.executable, str(ROOT / "bench" / "multi_objective.py"), "--model", "tiny"]
    cmd += ["--steps", "2", "--seeds", "1", "--out", str(tmp_path), "--arms", *arms]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    assert lines[-1].startswith("hv_ratio=")
    for arm in arms:
        assert any(line.split()[:1] == [arm] for line in lines), proc.stdout
        assert (tmp_path / f"{arm}_0" / "eval.json").exists()
    assert (tmp_path / "gradient_0" / "weighting.png").exists()
