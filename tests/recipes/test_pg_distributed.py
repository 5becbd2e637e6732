"""Several processes optimise the batch loss: with 2 ranks, each rank's gradient after DDP's
all-reduce equals the 1-process gradient of the whole step (tests/recipes/pg_ddp_gradients.py)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "tests" / "recipes" / "pg_ddp_gradients.py"
LAUNCH_2 = [sys.executable, "-m", "accelerate.commands.launch", "--config_file"]
LAUNCH_2 += [str(ROOT / "launch" / "cpu_2proc.yaml")]


def _cases():
    spec = importlib.util.spec_from_file_location("pg_ddp_gradients", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return [(case, agg) for case in module.REWARDS for agg in module.AGGREGATIONS]


def _run(cmd: list[str], log: Path) -> None:
    with log.open("w") as f:
        code = subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, timeout=600)
    assert code.returncode == 0, log.read_text()[-3000:]


@pytest.fixture(scope="module")
def launched(tiny_llama, tmp_path_factory) -> Path:
    """The script's outputs with 1 process and with 2 (one launch each, for every test here)."""
    from torch.distributed.elastic.utils.distributed import get_free_port

    out = tmp_path_factory.mktemp("ddp")
    _run([sys.executable, str(SCRIPT), tiny_llama, str(out)], out / "one.log")
    port = ["--main_process_port", str(get_free_port())]
    _run([*LAUNCH_2, *port, str(SCRIPT), tiny_llama, str(out)], out / "two.log")
    return out


@pytest.mark.multiprocess
def test_two_ranks_hold_the_one_process_gradient(launched):
    tmp_path = launched
    for case, agg in _cases():
        one = torch.load(tmp_path / f"grad_1_0_{case}_{agg}.pt")
        if case == "rank1_drops_all":  # the second rank trains on a stand-in group
            assert one["keep"].tolist() == [True, True, False, False]
        scale = one["grad"].abs().max().item()
        assert scale > 1e-4  # a real gradient, not zeros on both sides
        for rank in (0, 1):
            two = torch.load(tmp_path / f"grad_2_{rank}_{case}_{agg}.pt")
            diff = (two["grad"] - one["grad"]).abs().max().item()
            print(case, agg, rank, diff, scale)
            assert diff < 1e-5 and diff < 1e-4 * scale, (case, agg, rank, diff, scale)
            assert abs(two["loss"] - one["loss"]) < 1e-5, (case, agg, rank)


@pytest.mark.multiprocess
def test_two_ranks_compute_the_one_process_influences(launched):
    """weighting.method=gradient: each objective's gradient is all-reduced before the dot
    products, so both ranks' influences equal the 1-process ones (to 1e-5); the objective that
    is None for the whole step has none."""
    one = torch.load(launched / "influences_1_0.pt")
    assert one[2] is None and all(abs(v) > 1e-8 for v in one[:2])
    for rank in (0, 1):
        two = torch.load(launched / f"influences_2_{rank}.pt")
        assert two[2] is None
        for a, b in zip(one[:2], two[:2], strict=True):
            assert abs(a - b) < 1e-5 * max(1.0, abs(a)), (rank, one, two)
