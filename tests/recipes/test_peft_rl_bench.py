"""bench/peft_rl.py and bench/rl_vs_sft_spectra.py end to end on a tiny model (slow: short
training runs, the untrained-task scores and full diagnostics)."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def bench(name: str, *args: str) -> list[str]:
    cmd = [sys.executable, str(ROOT / "bench" / name), *args]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout.strip().splitlines()


@pytest.mark.slow
def test_peft_bench_then_the_spectra_of_its_full_fine_tune(tmp_path):
    variants = ["lora", "lora_guard", "lora_guard_grad", "full"]
    tiny = ["--model", "tiny", "--steps", "2", "--seeds", "1", "--out", str(tmp_path)]
    lines = bench("peft_rl.py", *tiny, "--variants", *variants)
    assert lines[-1].startswith("off_principal_vs_lora=")
    assert lines[-2].startswith("forgetting_ratio=")
    assert lines[-2].split("=")[1] == "nan" or float(lines[-2].split("=")[1]) >= 0
    rows = {
        line.split()[0]: line.split()
        for line in lines
        if line.split()[:1] in [[v] for v in variants]
    }
    assert set(rows) == set(variants)
    share = {v: float(rows[v][-4]) for v in variants}  # the principal share column
    assert max(share["lora_guard"], share["lora_guard_grad"]) < 1e-3 < share["lora"]
    for v in variants:  # each untrained task's change (small, minus, times) and the forgetting
        assert all(math.isfinite(float(x)) for x in rows[v][3:7]), rows[v]  # loss are numbers
    # the untrained-task scores are kept per run, so an added seed or variant scores only itself
    kept = {path.name for path in (tmp_path / "untrained").iterdir()}
    assert kept == {"base.json", *(f"{v}_0.json" for v in variants)}
    grpo, out = str(tmp_path / "full_0" / "final"), str(tmp_path / "spectra")
    args = ["--base", str(tmp_path / "tiny"), "--grpo", grpo, "--sft-steps", "2", "--out", out]
    spectra = bench("rl_vs_sft_spectra.py", *args)
    assert spectra[-1].startswith("contrast_holds=")
    assert sum(line.startswith(("off-principal", "bf16 sparsity")) for line in spectra) == 2
