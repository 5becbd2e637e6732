"""rlx.distributed: the one place where ranks exchange data.

- two gloo processes gather, reduce and agree as documented, and get CPU tensors back;
- no other module of rlx or of the recipes calls accelerate's or torch.distributed's collectives
  (over NCCL they need GPU tensors, which only rlx.distributed takes care of).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

from rlx import distributed

ROOT = Path(__file__).resolve().parents[1]
COLLECTIVES = {
    "gather",
    "reduce",
    "all_reduce",
    "all_gather",
    "all_gather_into_tensor",
    "all_gather_object",
    "gather_object",
    "broadcast",
    "broadcast_object_list",
    "reduce_scatter",
    "reduce_scatter_tensor",
    "scatter",
    "pad_across_processes",
}
ALLOWED = {"rlx/distributed.py"}


def _receiver(node: ast.expr) -> str:
    """The dotted name a method is called on: `self.run.accelerator`, `torch.distributed`."""
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_receiver(node.value)}.{node.attr}"
    return ""


def direct_collectives(source: str) -> list[str]:
    """Calls of a collective on an accelerator or on torch.distributed, and collectives imported
    from accelerate.utils or torch.distributed, in one file's source."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            receiver = _receiver(node.func.value)
            last = receiver.rsplit(".", 1)[-1]
            # `distributed` alone is rlx.distributed, the allowed way
            on_group = last in {"accelerator", "dist"} or receiver.endswith("torch.distributed")
            if on_group and node.func.attr in COLLECTIVES:
                found.append(f"line {node.lineno}: {receiver}.{node.func.attr}(...)")
        if isinstance(node, ast.ImportFrom) and node.module in (
            "accelerate.utils",
            "accelerate.utils.operations",
            "torch.distributed",
        ):
            for alias in node.names:
                if alias.name in COLLECTIVES:
                    found.append(f"line {node.lineno}: from {node.module} import {alias.name}")
    return found


def test_the_rule_catches_direct_collectives():
    bad = (
        "from accelerate.utils import gather\n"
        "x = self.run.accelerator.gather(t)\n"
        "y = accelerator.reduce(t, 'sum')\n"
        "torch.distributed.all_reduce(t)\n"
        "dist.broadcast(t, 0)\n"
    )
    assert len(direct_collectives(bad)) == 5
    fine = "logp = logits.gather(-1, ids)\ngroup.broadcast([t], opts)\ndistributed.gather(t)\n"
    assert direct_collectives(fine) == []


def test_no_module_calls_collectives_directly():
    offenders = {}
    for path in sorted([*ROOT.glob("rlx/**/*.py"), *ROOT.glob("recipes/*.py")]):
        name = str(path.relative_to(ROOT))
        if name not in ALLOWED:
            found = direct_collectives(path.read_text())
            if found:
                offenders[name] = found
    assert not offenders, f"use rlx.distributed instead: {offenders}"


def test_one_process_without_a_group_returns_its_input():
    t = torch.tensor([[1.0, 2.0]])
    assert not distributed.active()
    assert torch.equal(distributed.gather(t), t)
    assert torch.equal(distributed.reduce(t, "max"), t)
    assert distributed.agree(False) is False and distributed.agree(True) is True
    assert distributed.max_over_ranks(3) == 3
    with pytest.raises(ValueError, match="unknown reduction"):
        distributed.reduce(t, "mean")


def _worker(rank: int, world: int, port: int, out: str) -> None:
    import torch.distributed as dist

    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )
    try:
        local = torch.tensor([[float(rank), 10.0 + rank]])
        result = {
            "gather": distributed.gather(local),
            "sum": distributed.reduce(local, "sum"),
            "min": distributed.reduce(local, "min"),
            "agree_one": distributed.agree(rank == 1),
            "agree_none": distributed.agree(False),
            "max": distributed.max_over_ranks(3 + 2 * rank),
        }
        torch.save(result, f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.multiprocess
def test_two_gloo_ranks_gather_reduce_and_agree(tmp_path):
    from torch.distributed.elastic.utils.distributed import get_free_port
    from torch.multiprocessing import spawn

    spawn(_worker, args=(2, get_free_port(), str(tmp_path)), nprocs=2, join=True)
    for rank in (0, 1):
        r = torch.load(tmp_path / f"rank{rank}.pt")
        assert torch.equal(r["gather"], torch.tensor([[0.0, 10.0], [1.0, 11.0]]))
        assert r["gather"].device.type == "cpu"
        assert torch.equal(r["sum"], torch.tensor([[1.0, 21.0]]))
        assert torch.equal(r["min"], torch.tensor([[0.0, 10.0]]))
        assert r["agree_one"] is True and r["agree_none"] is False
        assert r["max"] == 5
