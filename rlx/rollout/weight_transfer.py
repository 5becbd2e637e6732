"""Weight sync from the trainer to vLLM rollout servers: the transport choice, the watchdog both
transports run under, and rlx's gloo transport (vLLM's weight-transfer API on CPU).

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

On GPUs the servers run vLLM's own `nccl` engine and the trainer side is `NcclSender`
(rlx/rollout/nccl_sender.py). `rollout.sync_backend` picks the transport for the trainer and for
`rlx serve` alike (`resolve_sync_backend`), so both sides read it from one config file.

Every blocking open and send runs under `within_deadline`: NCCL has no timeout of its own, and a
server that died mid-sync would otherwise hang the trainer for ever.

vLLM is imported inside the functions that use it (deferred): a trainer that syncs nothing, or
only checks its settings, never loads it.
"""

from __future__ import annotations

import datetime
import socket
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future

import torch

from rlx.config.choices import SYNC_BACKENDS
from rlx.config.core import ConfigError
from rlx.errors import UserError

BACKEND = "rlx_gloo"
POLL_S = 0.05  # how often a waiting sender looks at its deadline and at the servers' answers


class RolloutWorkerError(UserError, RuntimeError):
    """A rollout server did not answer, answered an error, or died (the message names it)."""


def resolve_sync_backend(choice: str) -> str:
    """rollout.sync_backend -> "nccl" or "gloo": auto = nccl where CUDA is present, else gloo.
    The trainer and `rlx serve` both call this, so they agree when they read one config file."""
    if choice not in SYNC_BACKENDS:
        raise ConfigError(f"rollout.sync_backend must be one of {SYNC_BACKENDS}, not {choice!r}")
    cuda = torch.cuda.is_available()
    if choice == "nccl" and not cuda:
        raise ConfigError(
            "rollout.sync_backend=nccl needs a CUDA GPU and none is visible here: use "
            "rollout.sync_backend=gloo (or auto) on this machine"
        )
    if choice == "auto":
        return "nccl" if cuda else "gloo"
    return choice


def transfer_backend(sync_backend: str) -> str:
    """The vLLM weight-transfer engine a server runs for a resolved sync backend."""
    return "nccl" if sync_backend == "nccl" else BACKEND


def raise_first_error(jobs: Sequence[Future]) -> None:
    """A server's own error explains a failed or stuck collective better than the transport's:
    raise the first one that has already come back, if any."""
    for job in jobs:
        if job.done() and job.exception() is not None:
            raise job.exception()


def within_deadline(
    fn: Callable[[], object],
    timeout_s: float,
    phase: str,
    peers: Sequence[Future] = (),
    on_abandon: Callable[[], None] | None = None,
):
    """fn() with a deadline: its result, or RolloutWorkerError naming `phase` after `timeout_s`;
    a server call in `peers` that fails meanwhile is raised at once instead of waiting it out.
    NCCL calls block in C (communicator setup, lazy connections) or on the GPU (a kernel waiting
    for a peer) with no timeout, and Python cannot interrupt a thread stuck in C: so fn runs in a
    daemon thread, abandoned on expiry or a peer's failure (`on_abandon` aborts what it can)."""
    outcome: dict[str, object] = {}

    def run() -> None:
        try:
            outcome["value"] = fn()
        except BaseException as err:  # handed to the waiting thread
            outcome["error"] = err

    worker = threading.Thread(target=run, name=f"rlx weight sync: {phase}", daemon=True)
    worker.start()
    deadline = time.monotonic() + timeout_s
    while worker.is_alive():
        worker.join(POLL_S)
        if worker.is_alive() and (time.monotonic() > deadline or _failed(peers)):
            if on_abandon is not None:
                on_abandon()
            raise_first_error(peers)
            raise RolloutWorkerError(
                f"{phase} did not finish within rollout.timeout_s={timeout_s:g} s: a rollout "
                "server is hung, died, or cannot reach this trainer"
            )
    if "error" in outcome:
        raise outcome["error"]
    return outcome.get("value")


def _failed(jobs: Sequence[Future]) -> bool:
    return any(job.done() and job.exception() is not None for job in jobs)


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


def check_members(group, rank: int, world_size: int, token: str) -> list[int]:
    """The membership proof of an open group (rlx/rollout/auth.py): rank 0 broadcasts a fresh
    challenge, every rank all-gathers its HMAC of it, and each side returns the ranks whose
    proof does not match its own token (empty: every member holds the token)."""
    from rlx.rollout.auth import CHALLENGE_BYTES, bad_members, membership_proof, new_challenge

    challenge = torch.zeros(CHALLENGE_BYTES, dtype=torch.uint8)
    if rank == 0:
        challenge = torch.frombuffer(bytearray(new_challenge()), dtype=torch.uint8)
    broadcast(group, challenge)
    nonce = challenge.numpy().tobytes()
    mine = torch.frombuffer(bytearray(membership_proof(token, nonce, rank)), dtype=torch.uint8)
    proofs = [torch.empty_like(mine) for _ in range(world_size)]
    group.allgather([proofs], [mine]).wait()
    return bad_members(token, nonce, [p.numpy().tobytes() for p in proofs])


class SyncAuthError(RolloutWorkerError):
    """A weight-sync peer did not prove the trainer's token (the message names its rank)."""


def refuse_members(bad: Sequence[int], side: str) -> None:
    """One error line for members whose proof failed, as `side` (trainer or server) sees it."""
    if bad:
        raise SyncAuthError(
            f"weight-sync group member(s) at rank {', '.join(map(str, bad))} did not prove the "
            f"{side}'s token: start every `rlx serve` and the trainer with the same "
            "rollout.token (or RLX_SERVE_TOKEN); the group was closed before any weight was sent"
        )


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

    backend = "gloo"

    def __init__(self, host: str, port: int = 0, token: str = ""):
        self.host = host
        self.token = token  # every member proves it before weights travel (check_members)
        self.listen = socket.create_server((host, port))
        self.port = self.listen.getsockname()[1]
        self.group = None
        self.timeout_s = 600.0

    def init_info(self, rank_offset: int, world_size: int, timeout_s: float) -> dict:
        """What one server's `/init_weight_transfer_engine` gets (rlx_gloo's GlooInitInfo)."""
        return {
            "master_address": self.host,
            "master_port": self.port,
            "rank_offset": rank_offset,
            "world_size": world_size,
            "timeout_s": timeout_s,
        }

    def open(self, world_size: int, timeout_s: float, peers: Sequence[Future] = ()) -> None:
        """Wait for the servers' workers to join (they were told host, port and world size)."""
        self.timeout_s = timeout_s

        def join():
            return open_group(self.host, self.port, 0, world_size, timeout_s, self.listen)

        self.group = within_deadline(join, timeout_s, "opening the gloo group", peers)

        def prove():
            return check_members(self.group, 0, world_size, self.token)

        bad = within_deadline(prove, timeout_s, "checking the gloo group's members", peers)
        if bad:
            self.close()
            refuse_members(bad, "trainer")

    def send(
        self,
        tensors: Sequence[torch.Tensor],
        dtype_names: Sequence[str],
        peers: Sequence[Future] = (),
    ) -> None:
        def broadcast_all() -> None:
            for _, indices in flat_groups(dtype_names):
                flat = torch.cat([tensors[i].detach().reshape(-1) for i in indices])
                broadcast(self.group, flat)

        within_deadline(
            broadcast_all, self.timeout_s, "sending weights over gloo", peers, self._abandon
        )

    def _abandon(self) -> None:
        """After a timeout or a server's failure mid-send: forget the group. The abandoned
        broadcast thread still holds it until gloo's own timeout ends it, so it is not
        destroyed under that thread; the trainer's next update makes a new group."""
        self.group = None

    def close(self) -> None:
        if self.group is not None:
            close_group(self.group)
            self.group = None
        self.listen.close()  # harmless once the store owns its descriptor


def aligned_order(
    named_tensors: Sequence[tuple[str, torch.Tensor]],
) -> list[tuple[str, torch.Tensor]]:
    """The chunk with the widest elements first (stable otherwise). vLLM's packed receiver views
    each tensor's bytes in place, which fails unless its offset is a multiple of its element
    size ("storage_offset must be divisible by 4", measured with bf16 before fp32); in this
    order every offset is a sum of sizes that are multiples of the element size."""
    return sorted(named_tensors, key=lambda item: -item[1].element_size())


def update_info(named_tensors: Sequence[tuple[str, torch.Tensor]]) -> dict:
    """The `/update_weights` payload describing one chunk."""
    return {
        "names": [name for name, _ in named_tensors],
        "dtype_names": [str(t.dtype).removeprefix("torch.") for _, t in named_tensors],
        "shapes": [list(t.shape) for _, t in named_tensors],
    }
