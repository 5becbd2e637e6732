"""Weight sync from the trainer to vLLM rollout servers over gloo: vLLM's weight-transfer API on CPU.

vLLM's RL endpoints (`/start_weight_update`, `/update_weights`, `/finish_weight_update`, mounted
with `VLLM_SERVER_DEV_MODE=1`) drive a pluggable *weight-transfer engine* inside each server's
worker. vLLM's own engines need NCCL, CUDA IPC or Ray, so none runs on a CPU; this module adds
`rlx_gloo`, registered through the `vllm.general_plugins` entry point (pyproject.toml), so a
server started with `--weight-transfer-config '{"backend": "rlx_gloo"}'` can receive weights.

The transport is one stateless torch.distributed gloo group (vLLM's
`stateless_init_torch_distributed_process_group`, so it never touches the trainer's own process
group): the trainer is rank 0 and hosts the rendezvous, the servers' workers take ranks 1..W.
Each `/update_weights` call carries the names, dtypes and shapes of one chunk; the trainer then
broadcasts the chunk as one flat buffer per dtype. The worker loads it through vLLM's layer-wise
reload (checkpoint-format names, the same path the in-process engine uses), and re-packs a tied
`lm_head` on CPU at the end, as the in-process engine does.

On GPUs use vLLM's `nccl` engine instead; the trainer side (`GlooSender`) is rlx's.
"""

from __future__ import annotations

import datetime
import socket
from collections.abc import Sequence

import torch

BACKEND = "rlx_gloo"


def dtype_of(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown dtype name {name!r} in a weight update")
    return dtype


def flat_groups(dtype_names: Sequence[str]) -> list[tuple[str, list[int]]]:
    """The chunk's tensors grouped by dtype, in order of first appearance: [(dtype, indices)].
    Both sides derive the flat buffers from this, so they agree on what each broadcast holds."""
    groups: dict[str, list[int]] = {}
    for i, name in enumerate(dtype_names):
        groups.setdefault(name, []).append(i)
    return list(groups.items())


def open_group(host: str, port: int, rank: int, world_size: int, timeout_s: float, listen=None):
    """The gloo group of one trainer (rank 0) and the servers' workers. The trainer hosts the
    rendezvous store on its own `listen` socket: under torchrun / accelerate launch, torch's
    tcp:// rendezvous would otherwise look for the launcher's store and never host one."""
    from vllm.distributed.utils import stateless_init_torch_distributed_process_group

    return stateless_init_torch_distributed_process_group(
        host,
        port,
        rank,
        world_size,
        backend="gloo",
        listen_socket=listen,
        timeout=datetime.timedelta(seconds=timeout_s),
    )


def broadcast(group, tensor: torch.Tensor) -> None:
    """Broadcast from group rank 0 (the trainer), in place on the receivers."""
    opts = torch.distributed.BroadcastOptions()
    opts.rootRank = 0
    group.broadcast([tensor], opts).wait()


def close_group(group) -> None:
    from vllm.distributed.utils import stateless_destroy_torch_distributed_process_group

    stateless_destroy_torch_distributed_process_group(group)


def repack_tied_lm_head(model) -> None:
    """vLLM-CPU keeps a packed copy of each linear weight for its GEMM kernels; a tied lm_head
    shares the embedding parameter but may keep its own packed copy: re-pack it after a reload.
    (vLLM 0.32's layer-wise reload refreshes it already: the tied-embedding sync tests pass
    without this on an AVX-512 machine. It stays as a cheap guard for other kernels.)"""
    from vllm.platforms import current_platform

    tied = getattr(getattr(model, "config", None), "tie_word_embeddings", False)
    if current_platform.is_cpu() and tied and hasattr(model, "lm_head"):
        from vllm.model_executor.layers.utils import dispatch_cpu_unquantized_gemm

        dispatch_cpu_unquantized_gemm(model.lm_head, remove_weight=False)


def register() -> None:
    """The `vllm.general_plugins` entry point: make `rlx_gloo` a weight-transfer backend. vLLM
    calls it in every process it starts, possibly more than once."""
    from vllm.distributed.weight_transfer.factory import WeightTransferEngineFactory

    if BACKEND not in WeightTransferEngineFactory._registry:  # imported when a server uses it
        WeightTransferEngineFactory.register_engine(
            BACKEND, "rlx.rollout.gloo_worker", "GlooWeightTransferEngine"
        )


class GlooSender:
    """The trainer's side of `rlx_gloo`: rank 0 of the group, one broadcast per dtype per chunk.
    It listens on `host:port` (port 0: a free one, then `self.port`) before the servers join."""

    def __init__(self, host: str, port: int = 0):
        self.host = host
        self.listen = socket.create_server((host, port))
        self.port = self.listen.getsockname()[1]
        self.group = None

    def open(self, world_size: int, timeout_s: float) -> None:
        """Wait for the servers' workers to join (they were told host, port and world size)."""
        self.group = open_group(self.host, self.port, 0, world_size, timeout_s, self.listen)

    def send(self, tensors: Sequence[torch.Tensor], dtype_names: Sequence[str]) -> None:
        for _, indices in flat_groups(dtype_names):
            flat = torch.cat([tensors[i].detach().reshape(-1) for i in indices])
            broadcast(self.group, flat)

    def close(self) -> None:
        if self.group is not None:
            close_group(self.group)
            self.group = None
        self.listen.close()  # harmless once the store owns its descriptor


def update_info(named_tensors: Sequence[tuple[str, torch.Tensor]]) -> dict:
    """The `/update_weights` payload describing one chunk."""
    return {
        "names": [name for name, _ in named_tensors],
        "dtype_names": [str(t.dtype).removeprefix("torch.") for _, t in named_tensors],
        "shapes": [list(t.shape) for _, t in named_tensors],
    }
