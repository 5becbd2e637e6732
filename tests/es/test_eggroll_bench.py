"""bench/eggroll_throughput.py runs on the tiny model and ends with the ratio line."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BENCH = ROOT / "bench" / "eggroll_throughput.py"
SMALL = ["--model", "tiny", "--population", "4", "--prompts", "1", "--max-new-tokens", "4"]
SMALL += ["--repeats", "1"]


def run_bench(backends: str) -> list[str]:
    out = subprocess.run(
        [sys.executable, str(BENCH), *SMALL, "--backends", backends],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout.strip().splitlines()


def test_bench_hf_batched_reports_the_ratio():
    lines = run_bench("hf_batched")
    assert re.fullmatch(r"population_throughput_ratio=\d+\.\d{3}", lines[-1])
    assert any(line.startswith("hf_batched") for line in lines)
    assert any('"tokens_per_run": 16' in line for line in lines)  # 4 members x 1 prompt x 4 tokens


@pytest.mark.slow
def test_bench_every_backend():
    lines = run_bench("hf_batched,vllm_lora,inplace")
    for name in ("hf_batched", "vllm_lora", "inplace"):
        assert any(line.startswith(name) and "FAILED" not in line for line in lines), name
    # the ratio is against the fastest plain engine of the run, not each backend's own
    rows = [json.loads(line) for line in lines if line.startswith("{")]
    expected = max(r["population_tok_s"] for r in rows) / max(r["plain_tok_s"] for r in rows)
    assert float(lines[-1].split("=")[1]) == pytest.approx(expected, abs=2e-3)
