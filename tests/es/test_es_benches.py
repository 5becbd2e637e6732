"""bench/es_sweep.py and bench/es_diagnose.py end to end on a tiny model (slow: short ES runs, a
vLLM engine for the held-out evaluations)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
LONGER = "def longer(prompts, completions, **kw):\n    return [min(len(c), 40) / 40 for c in completions]\n"


def bench(name: str, *args: str) -> list[str]:
    cmd = [sys.executable, str(ROOT / "bench" / name), *args]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout.strip().splitlines()


@pytest.mark.slow
def test_sweep_prints_every_arm_and_the_best(tmp_path):
    arms = ["base", "lr2x"]
    lines = bench("es_sweep.py", "--model", "tiny", "--steps", "2", "--minutes", "0",
                  "--out", str(tmp_path), "--arms", *arms)  # fmt: skip
    assert lines[-1].startswith("best_arm=") and "base_gain=" in lines[-1]
    for arm in arms:
        row = [line.split() for line in lines if line.split()[:1] == [arm]][-1]  # the table's
        assert int(float(row[4])) == 2  # steps
        result = json.loads((tmp_path / f"{arm}_0" / "result.json").read_text())
        assert float(row[3]) == pytest.approx(result["gain"], abs=1e-3)
        assert not (tmp_path / f"{arm}_0" / "checkpoints").exists()


@pytest.mark.slow
def test_diagnose_reproduces_the_runs_evaluations(tmp_path, tiny_llama):
    """At 0x and 1x the update, the held-out reward is the run's own before / after (same engine,
    greedy); the table has every row."""
    reward = tmp_path / "longer.py"
    reward.write_text(LONGER)
    run = tmp_path / "run"
    cmd = [sys.executable, str(ROOT / "recipes" / "es.py"), "--config", "recipes/es.yaml"]
    cmd += [f"model.name={tiny_llama}", "steps=2", "es.population_size=8", "prompts_per_step=2"]
    cmd += ["rollout.max_new_tokens=8", "eval.max_new_tokens=8", "eval.num_prompts=8"]
    cmd += ["rollout.dtype=float32", "es.population_dtype=float32", "es.lr=0.05", "es.sigma=0.02"]
    cmd += [f"rewards=[{{func: '{reward}:longer'}}]", f"output_dir={run}", "log_with=[]"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = bench("es_diagnose.py", "--run", str(run), "--reseeds", "2")
    table = lines[next(i for i, line in enumerate(lines) if line.startswith("measure")) + 1 :]
    value = {line.rsplit(" ", 1)[0].strip(): line.rsplit(" ", 1)[1] for line in table}
    results = json.loads((run / "eval.json").read_text())
    assert float(value["held-out reward at 0 x the update"]) == pytest.approx(
        results["before"]["reward_mean"],
        abs=6e-4,  # printed with 3 decimals
    )
    assert float(value["held-out reward at 1 x the update"]) == pytest.approx(
        results["after"]["reward_mean"], abs=6e-4
    )
    assert float(value["fitness std across reseeds, greedy (T=0, 2 reseeds)"]) == 0.0
    assert float(value["ES completions per 10 min"]) > 0
    assert float(value["update RMS / sigma per step (median)"]) > 0
