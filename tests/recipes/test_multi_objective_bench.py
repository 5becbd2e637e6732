"""bench/multi_objective.py end to end on a tiny model (slow: a base evaluation and three short
training runs), and its refusal to mix runs of other settings in one folder."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_bench_prints_every_run_every_arm_and_both_ratios(tmp_path):
    arms = ["static_uniform", "hypervolume", "gradient"]
    cmd = [sys.executable, str(ROOT / "bench" / "multi_objective.py"), "--model", "tiny"]
    cmd += ["--steps", "2", "--seeds", "1", "--out", str(tmp_path), "--arms", *arms]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    assert lines[-2].startswith("hv_ratio_vs_uniform=")
    assert lines[-1].startswith("hv_ratio_vs_best_static=")
    assert any(line.startswith("hypervolume reference (base less") for line in lines)
    for arm in arms:
        assert any(line.split()[:1] == [arm] for line in lines), proc.stdout  # its mean and std
        assert any(line.strip().startswith(f"{arm} seed 0: correctness=") for line in lines)
        before = json.loads((tmp_path / f"{arm}_0" / "eval.json").read_text())["before"]
        base = json.loads((tmp_path / "base.json").read_text())  # measured before any run
        assert before["rewards"] == base["rewards"]
    assert "warning" not in proc.stdout
    assert (tmp_path / "gradient_0" / "weighting.png").exists()
    assert (tmp_path / "pareto.png").stat().st_size > 0


def test_bench_refuses_a_folder_of_runs_made_with_other_settings(tmp_path):
    settings = {"model": "tiny", "steps": 2, "set": ["prompts_per_step=4"]}
    (tmp_path / "settings.json").write_text(json.dumps(settings))
    cmd = [sys.executable, str(ROOT / "bench" / "multi_objective.py"), "--model", "tiny"]
    cmd += ["--steps", "2", "--out", str(tmp_path)]  # no --set: other settings
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "prompts_per_step=4" in proc.stderr and "another --out" in proc.stderr
    assert not (tmp_path / "base.json").exists()  # refused before any evaluation
    assert json.loads((tmp_path / "settings.json").read_text()) == settings  # kept as it was


def test_ratio_is_inf_where_only_the_dynamic_arm_has_hypervolume():
    import importlib.util

    spec = importlib.util.spec_from_file_location("mo_bench", ROOT / "bench" / "multi_objective.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench.ratio(0.3, 0.6) == 0.5
    assert bench.ratio(0.3, 0.0) == float("inf")
    assert str(bench.ratio(0.0, 0.0)) == "nan"
