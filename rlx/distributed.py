"""Every cross-rank operation of the training loops, in one place.

    gather(t)          [n, ...] of each rank -> [world * n, ...] in rank order, on every rank
    reduce(t, op)      elementwise sum / max / min over ranks, on every rank
    agree(flag)        True on every rank when it is True on any: a skip or stop decision that all
                       ranks take together, before any of them acts on it
    max_over_ranks(n)  the largest of an integer over ranks (e.g. micro-batches to run under ZeRO-3)

Tensors go to the process group's device for the collective (the GPU for NCCL, which refuses CPU
tensors; the CPU for gloo) and come back on the CPU, where the loops use them. Without a process
group (one plain process) each call returns its input: nothing crosses processes. With one, the
collective runs even at world size 1, so a one-GPU run still sends everything through NCCL.

The loops and the rest of rlx never call accelerate's or torch.distributed's collectives
themselves (tests/test_distributed.py checks it); barriers (`accelerator.wait_for_everyone`) and
DeepSpeed's own collectives inside its engine are not data exchanges of the loop and stay where
they are. The rollout servers' weight-sync groups (rlx/rollout/weight_transfer.py) are separate,
stateless groups with their own transport.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

REDUCE_OPS = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}


def active() -> bool:
    """True when this process belongs to a process group (accelerate / torchrun launch)."""
    return dist.is_available() and dist.is_initialized()


def backend() -> str:
    """The default process group's backend ("nccl", "gloo"); "" without one."""
    return str(dist.get_backend()).lower() if active() else ""


def collective_device() -> torch.device:
    """Where the default group's collectives take their tensors: the current GPU for NCCL, else the
    CPU (gloo; DeepSpeed on CPU also talks over gloo)."""
    if "nccl" in backend():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def gather(tensor: torch.Tensor) -> torch.Tensor:
    """Each rank's `tensor` (the same shape on every rank), concatenated along dim 0 in rank order,
    on the CPU of every rank."""
    if not active():
        return tensor.detach().cpu()
    local = tensor.detach().to(collective_device()).contiguous()
    parts = [torch.empty_like(local) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, local)
    return torch.cat([p.cpu() for p in parts])


def reduce(tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """Elementwise `op` ("sum", "max" or "min") of `tensor` over ranks, on the CPU."""
    if op not in REDUCE_OPS:
        raise ValueError(f"unknown reduction {op!r}: choose one of {sorted(REDUCE_OPS)}")
    if not active():
        return tensor.detach().cpu()
    work = tensor.detach().to(collective_device()).clone()
    dist.all_reduce(work, op=REDUCE_OPS[op])
    return work.cpu()


def agree(flag: bool) -> bool:
    """True on every rank when `flag` is True on any rank. Every rank must call it at the same point:
    a decision that only some ranks take makes the next collective pair up the wrong calls."""
    return bool(reduce(torch.tensor([float(flag)]), "max").item())


def max_over_ranks(value: int) -> int:
    """The largest `value` over ranks."""
    return int(reduce(torch.tensor([value], dtype=torch.long), "max").item())
