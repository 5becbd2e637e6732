"""The trainer's side of vLLM's `nccl` weight-transfer engine, for rollout servers on GPUs.

A server started by `rlx serve` with rollout.sync_backend resolving to nccl runs vLLM's own
`NCCLWeightTransferEngine` (vllm/distributed/weight_transfer/nccl_engine.py). Its workers join a
`StatelessProcessGroup` rendezvous at the trainer's address and build a `PyNcclCommunicator` on
it; the trainer is rank 0 and hosts the rendezvous, each server's workers sit at its rank offset
(vLLM ranks a worker `rank_offset + dp_rank * tp * pp + rank`, matching `/get_world_size`).

The wire format is vLLM's packed broadcast, which the trainer switches on in the init info
(`packed`, `packed_buffer_size_bytes`, `packed_num_buffers`): each `/update_weights` call names the
chunk's tensors (names, dtype_names, shapes) and the trainer broadcasts them as flat uint8
buffers, cut where the running byte count first exceeds the buffer size. The packing is vLLM's
own `pack_tensors` (its producer's), so both sides cut the stream at the same places.

NCCL waits for ever for a peer that never comes, so the open and every send run under
`within_deadline` (rollout.timeout_s); a send that times out aborts the communicator.

Not yet run on a GPU with vLLM: only the parts that run on a CPU are tested. vLLM is imported
inside the functions that use it (deferred, as in weight_transfer.py).
"""

from __future__ import annotations

import contextlib
import math
import socket
from collections.abc import Iterator, Sequence
from concurrent.futures import Future

import torch

from rlx.rollout.weight_transfer import within_deadline

BUFFER_BYTES = 1 << 30  # vLLM's DEFAULT_PACKED_BUFFER_SIZE_BYTES: one packed broadcast's size
NUM_BUFFERS = 2  # vLLM's DEFAULT_PACKED_NUM_BUFFERS: the receiver's double buffering


def trainer_device() -> torch.device:
    """The GPU this trainer process uses (accelerate / torchrun set the current device)."""
    return torch.device("cuda", torch.cuda.current_device())


def packed_buffers(
    tensors: Sequence[torch.Tensor], buffer_bytes: int, device: torch.device
) -> Iterator[torch.Tensor]:
    """The chunk as vLLM's packed broadcast sends it: flat uint8 buffers on `device`, each tensor
    moved there only when it is packed (so the trainer holds a buffer or two extra, never the
    whole chunk twice)."""
    from vllm.distributed.weight_transfer.packed_tensor import pack_tensors

    pairs = iter([(str(i), t.detach()) for i, t in enumerate(tensors)])

    def on_device(item: tuple[str, torch.Tensor]) -> torch.Tensor:
        return item[1].to(device)

    while (chunk := pack_tensors(pairs, on_device, buffer_bytes)) is not None:
        yield chunk.packed_tensor


def check_declared(tensors: Sequence[torch.Tensor], dtype_names: Sequence[str]) -> None:
    """The receiver sizes its buffers from the declared dtypes and views each tensor in place:
    a dtype mismatch would hang or load garbage, and a chunk not in `aligned_order` fails in the
    receiver. Refuse both before anything is sent."""
    got = [str(t.dtype).removeprefix("torch.") for t in tensors]
    if got != list(dtype_names):
        raise ValueError(f"weight sync: tensors have dtypes {got}, update declared {dtype_names}")
    sizes = [t.element_size() for t in tensors]
    if sizes != sorted(sizes, reverse=True):
        raise ValueError("weight sync: order the chunk widest dtype first (aligned_order)")


def open_nccl_group(host, port, world_size, timeout_s, listen, device):
    """Rank 0 of the trainer + workers NCCL group, as vLLM's `trainer_init` builds it, but on
    our own listening socket (port 0, and torchrun's store would shadow a tcp:// rendezvous) and
    with the store waiting at most `timeout_s`."""
    from vllm.distributed.device_communicators.pynccl import PyNcclCommunicator
    from vllm.distributed.utils import StatelessProcessGroup
    from vllm.utils.nccl import unpinned_nccl_env

    group = StatelessProcessGroup.create(
        host, port, 0, world_size, store_timeout=math.ceil(timeout_s), listen_socket=listen
    )
    with unpinned_nccl_env():
        comm = PyNcclCommunicator(group, device=device)
    if comm.disabled:  # PyNccl turns itself off silently when it cannot load libnccl
        raise RuntimeError("vLLM could not load the NCCL library in the trainer")
    return comm


class NcclSender:
    """The trainer (rank 0) of vLLM's nccl engine: the same interface as `GlooSender`. It listens
    on `host:port` (port 0: a free one, then `self.port`) before the servers join. `device`:
    where buffers are packed (default: this process's GPU; a CPU device only with a fake
    communicator, in tests)."""

    backend = "nccl"

    def __init__(
        self,
        host: str,
        port: int = 0,
        device: torch.device | str | None = None,
        buffer_bytes: int = BUFFER_BYTES,
    ):
        self.host = host
        self.listen = socket.create_server((host, port))
        self.port = self.listen.getsockname()[1]
        self.device = torch.device(device) if device is not None else trainer_device()
        self.buffer_bytes = buffer_bytes
        self.comm = None
        self.timeout_s = 600.0

    def init_info(self, rank_offset: int, world_size: int, timeout_s: float) -> dict:
        """What one server's `/init_weight_transfer_engine` gets: vLLM's
        NCCLWeightTransferInitInfo fields (it has no timeout field: the trainer keeps time)."""
        return {
            "master_address": self.host,
            "master_port": self.port,
            "rank_offset": rank_offset,
            "world_size": world_size,
            "packed": True,
            "packed_buffer_size_bytes": self.buffer_bytes,
            "packed_num_buffers": NUM_BUFFERS,
        }

    def open(self, world_size: int, timeout_s: float, peers: Sequence[Future] = ()) -> None:
        """Wait for the servers' workers to join and the communicator to warm up."""
        self.timeout_s = timeout_s

        def join():
            return open_nccl_group(
                self.host, self.port, world_size, timeout_s, self.listen, self.device
            )

        self.comm = within_deadline(join, timeout_s, "opening the NCCL group", peers)

    def send(
        self,
        tensors: Sequence[torch.Tensor],
        dtype_names: Sequence[str],
        peers: Sequence[Future] = (),
    ) -> None:
        """Broadcast one chunk (the one `/update_weights` described) and wait until it left."""
        check_declared(tensors, dtype_names)
        # the caller's stream: the tensors were produced on it, the worker thread must follow it
        stream = torch.cuda.current_stream(self.device) if self._cuda else None
        within_deadline(
            lambda: self._broadcast(tensors, stream),
            self.timeout_s,
            "sending weights over NCCL",
            peers,
            on_abandon=self._abort,
        )

    @property
    def _cuda(self) -> bool:
        return self.device.type == "cuda"

    def _broadcast(self, tensors: Sequence[torch.Tensor], stream) -> None:
        """Pack and broadcast on one stream, then wait for it. A buffer freed while its broadcast
        is queued is safe: the caching allocator reuses it only for later work on that stream."""
        on_gpu = contextlib.ExitStack()
        if self._cuda:  # a new thread starts on device 0 and its default stream
            on_gpu.enter_context(torch.cuda.device(self.device))
            on_gpu.enter_context(torch.cuda.stream(stream))
        with on_gpu:
            for buffer in packed_buffers(tensors, self.buffer_bytes, self.device):
                self.comm.broadcast(buffer, src=0, stream=stream)
            if stream is not None:
                stream.synchronize()

    def _abort(self) -> None:
        """After a timeout: abort the communicator so a kernel stuck waiting for a peer ends."""
        comm, self.comm = self.comm, None
        if comm is not None:
            with contextlib.suppress(Exception):
                comm.destroy()

    def close(self) -> None:
        self._abort()
        self.listen.close()  # harmless once the store owns its descriptor
