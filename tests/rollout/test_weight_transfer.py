"""The weight-sync transports without a GPU: what of the NCCL trainer side runs on a CPU (vLLM's
packed format read back by vLLM's own receiver, the init info and ranks each server gets, the
watchdog), the choice of transport (rollout.sync_backend), and `rlx serve`'s vLLM flags.

NCCL itself never runs here: a fake communicator records what the trainer broadcasts, and
vLLM's `NCCLWeightTransferEngine` receives it through a replaying one."""

from __future__ import annotations

import contextlib
import threading
import time
from concurrent.futures import Future
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoModelForCausalLM
from vllm.distributed.weight_transfer import nccl_common, packed_tensor
from vllm.distributed.weight_transfer.nccl_engine import (
    NCCLWeightTransferEngine,
    NCCLWeightTransferInitInfo,
)

from rlx.cli import main as rlx_main
from rlx.cli.serve import serve_command
from rlx.config import ConfigError, RolloutConfig
from rlx.rollout import http, nccl_sender
from rlx.rollout.gloo_worker import GlooInitInfo, worker_rank
from rlx.rollout.nccl_sender import NcclSender
from rlx.rollout.server import RolloutWorkerError, ServerEngine, make_sender, rank_offsets
from rlx.rollout.weight_transfer import (
    GlooSender,
    aligned_order,
    resolve_sync_backend,
    update_info,
    within_deadline,
)


class RecordingComm:
    """The trainer's communicator: keeps a copy of every broadcast buffer."""

    def __init__(self):
        self.sent: list[torch.Tensor] = []
        self.destroyed = False

    def broadcast(self, tensor, src, stream=None):
        assert src == 0 and tensor.dtype == torch.uint8
        self.sent.append(tensor.clone())

    def destroy(self):
        self.destroyed = True


class ReplayComm:
    """A worker's communicator: each broadcast receives the trainer's next buffer, which must
    have exactly the size the worker expects (on NCCL a mismatch hangs or loads garbage)."""

    def __init__(self, sent):
        self.sent = list(sent)

    def broadcast(self, tensor, src, stream=None):
        got = self.sent.pop(0)
        assert tensor.dtype == got.dtype and tensor.numel() == got.numel()
        tensor.copy_(got)


class BlockingComm(RecordingComm):
    """A broadcast that never returns until the test releases it (a peer that never comes)."""

    def __init__(self):
        super().__init__()
        self.release = threading.Event()

    def broadcast(self, tensor, src, stream=None):
        self.release.wait()


@pytest.fixture
def cpu_receiver(monkeypatch):
    """Let vLLM's packed NCCL receiver run on a CPU: no CUDA streams, no accelerator."""
    stream = SimpleNamespace(synchronize=lambda: None)
    monkeypatch.setattr(packed_tensor, "_get_streams", lambda device, n: (stream,) * n)
    monkeypatch.setattr(torch.accelerator, "current_device_index", lambda: 0)
    monkeypatch.setattr(torch.cuda, "stream", lambda s: contextlib.nullcontext())


def vllm_receive(init_info: dict, updates: list[dict], sent: list[torch.Tensor], monkeypatch):
    """What vLLM's nccl engine in a server loads from these init/update infos and buffers."""
    monkeypatch.setattr(
        "vllm.distributed.weight_transfer.nccl_engine.worker_init_process_group",
        lambda info, parallel: ReplayComm(sent),
    )
    loaded: list[tuple[str, torch.Tensor]] = []
    engine = NCCLWeightTransferEngine.__new__(NCCLWeightTransferEngine)  # no vLLM config here
    engine.parallel_config, engine.device = None, torch.device("cpu")
    engine.model = SimpleNamespace(
        load_weights=lambda w: loaded.extend((n, t.clone()) for n, t in w)
    )
    engine.init_transfer_engine(engine.parse_init_info(init_info))
    for update in updates:
        engine.receive_weights(engine.parse_update_info(update))
    assert not engine.model_update_group.sent, "the trainer sent buffers nobody received"
    return loaded


def mixed_tensors():
    gen = torch.Generator().manual_seed(0)
    return [  # 32, 10, 2, 32, 14, 12 bytes; widest first, 33-byte buffers: [a d] [f b c e]
        ("a.weight", torch.randn(2, 4, generator=gen)),
        ("b.bias", torch.randn(5, generator=gen).to(torch.bfloat16)),
        ("c.scale", torch.tensor(2.5, dtype=torch.float16)),
        ("d.weight", torch.randn(2, 2, 2, generator=gen)),
        ("e.weight", torch.randn(7, generator=gen).to(torch.bfloat16)),
        ("f.bias", torch.randn(3, generator=gen)),
    ]


def test_packed_broadcast_is_what_vllms_nccl_receiver_unpacks(cpu_receiver, monkeypatch):
    """Mixed dtypes and shapes in 33-byte buffers: the trainer cuts two buffers, and vLLM's
    own receiver, configured by the init info the trainer sends, gets each at the size it
    expects and loads every tensor bit for bit under its name."""
    named = aligned_order(mixed_tensors())
    assert [n[0] for n in named] == [
        "a.weight",
        "d.weight",
        "f.bias",
        "b.bias",
        "c.scale",
        "e.weight",
    ]
    sender = NcclSender("127.0.0.1", device="cpu", buffer_bytes=33)
    sender.comm = comm = RecordingComm()
    info = update_info(named)
    sender.send([t for _, t in named], info["dtype_names"])
    assert [b.numel() for b in comm.sent] == [64, 38]  # cut where vLLM cuts, not whole
    loaded = vllm_receive(sender.init_info(1, 2, 60), [info], comm.sent, monkeypatch)
    assert [n for n, _ in loaded] == [n for n, _ in named]
    for (_, want), (_, got) in zip(named, loaded, strict=True):
        assert got.dtype == want.dtype and got.shape == want.shape and torch.equal(got, want)
    sender.close()


def test_a_chunk_vllm_would_misread_is_refused():
    """dtypes other than declared, or an fp32 tensor after an odd bf16 one (vLLM's receiver
    cannot view it at a 2-byte offset): refused before anything is sent."""
    sender = NcclSender("127.0.0.1", device="cpu")
    sender.comm = comm = RecordingComm()
    with pytest.raises(ValueError, match="declared"):
        sender.send([torch.zeros(2)], ["bfloat16"])
    odd = [torch.zeros(3, dtype=torch.bfloat16), torch.zeros(2)]
    with pytest.raises(ValueError, match="widest dtype first"):
        sender.send(odd, ["bfloat16", "float32"])
    assert comm.sent == []
    sender.close()


def test_each_server_gets_its_rank_offset_and_its_backends_init_info(monkeypatch):
    """Three servers of 2, 1 and 4 workers: ranks 1-2, 3, 4-7 of a group of 8. The gloo and the
    nccl init info each parse as their own server engine's init info and not as the other's,
    and vLLM's nccl workers of a DP=2 x TP=2 server (and rlx_gloo's) take exactly its ranks."""
    offsets, world = rank_offsets([2, 1, 4])
    assert (offsets, world) == ([1, 3, 4], 8)
    gloo, nccl = GlooSender("127.0.0.1"), NcclSender("127.0.0.1", device="cpu")
    g, n = gloo.init_info(4, world, 60), nccl.init_info(4, world, 60)
    assert GlooInitInfo(**g).rank_offset == 4 and GlooInitInfo(**g).timeout_s == 60
    parsed = NCCLWeightTransferInitInfo(**n)
    assert (parsed.rank_offset, parsed.world_size, parsed.master_port) == (4, 8, nccl.port)
    assert parsed.packed and parsed.packed_buffer_size_bytes == nccl.buffer_bytes
    with pytest.raises(TypeError):
        NCCLWeightTransferInitInfo(**g)
    with pytest.raises(TypeError):
        GlooInitInfo(**n)

    ranks = []
    monkeypatch.setattr(torch.accelerator, "current_device_index", lambda: 0)
    monkeypatch.setattr(
        nccl_common, "stateless_init_process_group", lambda *a, **k: ranks.append(a[2])
    )
    workers = [
        SimpleNamespace(data_parallel_index=dp, world_size=2, rank=r)
        for dp in range(2)
        for r in range(2)
    ]
    for parallel in workers:
        nccl_common.worker_init_process_group(parsed, parallel)
    assert sorted(ranks) == [4, 5, 6, 7]
    assert sorted(worker_rank(p, 4) for p in workers) == [4, 5, 6, 7]
    gloo.close()
    nccl.close()


@pytest.mark.parametrize("cuda", [True, False])
def test_sync_backend_picks_the_transport(cuda, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(nccl_sender, "trainer_device", lambda: torch.device("cpu"))
    assert resolve_sync_backend("auto") == ("nccl" if cuda else "gloo")
    assert resolve_sync_backend("gloo") == "gloo"
    if cuda:
        assert resolve_sync_backend("nccl") == "nccl"
    else:
        with pytest.raises(ConfigError, match="sync_backend=nccl needs a CUDA GPU"):
            resolve_sync_backend("nccl")
    sender = make_sender(resolve_sync_backend("auto"), "127.0.0.1", 0)
    assert isinstance(sender, NcclSender if cuda else GlooSender)
    sender.close()


def test_nccl_without_a_gpu_is_one_line_from_rlx_serve(monkeypatch, capsys, tiny_tied):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    status = rlx_main(["serve", f"model.name={tiny_tied}", "rollout.sync_backend=nccl"])
    err = capsys.readouterr().err.strip()
    assert status == 2 and "\n" not in err
    assert "sync_backend=nccl needs a CUDA GPU" in err


def test_a_send_that_never_returns_raises_within_the_deadline():
    """NCCL waits for ever for a missing peer: the send gives up after rollout.timeout_s with
    one error naming the phase, and aborts the communicator."""
    sender = NcclSender("127.0.0.1", device="cpu")
    sender.comm = comm = BlockingComm()
    sender.timeout_s = 0.5
    start = time.monotonic()
    try:
        with pytest.raises(RolloutWorkerError, match="sending weights over NCCL did not finish"):
            sender.send([torch.zeros(4)], ["float32"])
        assert time.monotonic() - start < 3
        assert comm.destroyed and sender.comm is None
    finally:
        comm.release.set()
        sender.close()


def test_an_open_that_never_returns_raises_within_the_deadline(monkeypatch):
    release = threading.Event()
    monkeypatch.setattr(nccl_sender, "open_nccl_group", lambda *a: release.wait())
    sender = NcclSender("127.0.0.1", device="cpu")
    start = time.monotonic()
    try:
        with pytest.raises(RolloutWorkerError, match="opening the NCCL group.*timeout_s=0.5"):
            sender.open(2, 0.5)
        assert time.monotonic() - start < 3
    finally:
        release.set()
        sender.close()


def test_a_server_that_fails_meanwhile_is_raised_at_once():
    """A server that refuses to join answers at once: its error, not the timeout, ends the wait."""
    refused: Future = Future()
    refused.set_exception(RolloutWorkerError("rollout server http://h:1 answered HTTP 500"))
    release = threading.Event()
    start = time.monotonic()
    with pytest.raises(RolloutWorkerError, match="HTTP 500"):
        within_deadline(release.wait, 30, "opening the NCCL group", peers=[refused])
    assert time.monotonic() - start < 3
    release.set()
    with pytest.raises(KeyError, match="boom"):  # the work's own error comes through
        within_deadline(lambda: {}["boom"], 5, "sending")
    assert within_deadline(lambda: 7, 5, "sending") == 7


class FakeServer:
    """`http.Server.acall` for a server of `size` workers: answers what the engine asks and records
    the weight-sync calls; `refuse`: a path it answers with an HTTP error."""

    def __init__(self, size, refuse=None):
        self.size, self.calls, self.refuse = size, [], refuse

    def call(self, what, method, path, **kwargs):
        self.calls.append((path, kwargs.get("json")))
        if path == self.refuse:
            raise RolloutWorkerError(f"rollout server http://a:1 answered HTTP 400 while {what}")
        if path == "/v1/models":
            return {"data": [{"max_model_len": 1024}]}
        if path == "/get_world_size":
            return {"world_size": self.size}
        return {}


def fake_gpu_engine(tiny_tied, fakes, open_group, monkeypatch) -> ServerEngine:
    """A ServerEngine on a pretended GPU, talking to `fakes`, its NCCL group from `open_group`."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(nccl_sender, "trainer_device", lambda: torch.device("cpu"))
    monkeypatch.setattr(nccl_sender, "open_nccl_group", open_group)

    async def acall(self, what, method, path, timeout_s=None, **kwargs):
        return fakes[self.url[7:]].call(what, method, path, **kwargs)

    async def wait_ready(self, deadline):
        return (await acall(self, "listing its model", "GET", "/v1/models"))["data"][0]

    monkeypatch.setattr(http.Server, "wait_ready", wait_ready)
    monkeypatch.setattr(http.Server, "acall", acall)
    return ServerEngine(tiny_tied, list(fakes), timeout_s=30, sync_backend="auto")


def test_a_server_that_refuses_the_nccl_init_is_named_at_once(tiny_tied, monkeypatch):
    """A server on another sync_backend rejects vLLM's nccl init fields: its error, with the
    hint to start it from this config, comes at once, not after rollout.timeout_s."""
    release = threading.Event()
    fakes = {"a:1": FakeServer(1, refuse="/init_weight_transfer_engine")}
    engine = fake_gpu_engine(tiny_tied, fakes, lambda *a: release.wait(), monkeypatch)
    start = time.monotonic()
    try:
        with pytest.raises(RolloutWorkerError, match="HTTP 400.*same rollout.sync_backend .nccl"):
            engine.update_weights([("w", torch.zeros(2))])
        assert time.monotonic() - start < 5
    finally:
        release.set()
        engine.close()


def test_a_sync_over_nccl_end_to_end_without_a_gpu(tiny_tied, cpu_receiver, monkeypatch):
    """ServerEngine on a (pretended) GPU with sync_backend=auto: it opens NCCL, not gloo; each of
    two servers gets vLLM's init info at its offset; a sync in two chunks pauses, starts, sends,
    finishes and resumes; and vLLM's receiver loads the model's exact weights from it."""
    fakes = {"a:1": FakeServer(1), "b:2": FakeServer(2)}
    comm = RecordingComm()
    engine = fake_gpu_engine(tiny_tied, fakes, lambda *a: comm, monkeypatch)
    state = list(AutoModelForCausalLM.from_pretrained(tiny_tied).state_dict().items())
    state.insert(1, ("odd.bias", torch.ones(3, dtype=torch.bfloat16)))  # before fp32 ones
    with engine.weight_update():
        engine.update_weights(state[:3])
        engine.update_weights(state[3:])
    engine.close()
    for fake, offset in zip(fakes.values(), [1, 2], strict=True):
        paths = [p for p, _ in fake.calls if p not in ("/v1/models", "/get_world_size")]
        assert paths == [
            "/init_weight_transfer_engine",
            "/pause",
            "/start_weight_update",
            "/update_weights",
            "/update_weights",
            "/finish_weight_update",
            "/resume",
            "/shutdown_weight_transfer_engine",
        ]
        init = NCCLWeightTransferInitInfo(**fake.calls[2][1]["init_info"])
        assert (init.rank_offset, init.world_size, init.packed) == (offset, 4, True)
    init_info = fakes["a:1"].calls[2][1]["init_info"]
    updates = [body["update_info"] for p, body in fakes["a:1"].calls if p == "/update_weights"]
    loaded = vllm_receive(init_info, updates, comm.sent, monkeypatch)
    assert sorted(n for n, _ in loaded) == sorted(n for n, _ in state)
    want = dict(state)
    assert all(torch.equal(got, want[name]) for name, got in loaded)


@pytest.fixture(scope="module")
def vllm_server_args():
    """vLLM's own `vllm serve` argument parser, to check rlx serve's flags exist and parse."""
    from vllm.entrypoints.launchers.cli_args import make_arg_parser
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    return make_arg_parser(FlexibleArgumentParser())


def test_serve_passes_the_parallel_and_memory_knobs_on_a_gpu(
    tiny_tied, monkeypatch, vllm_server_args
):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    rollout = RolloutConfig(dtype="float32", gpu_memory_utilization=0.85, max_num_seqs=32)
    argv, _ = serve_command(
        tiny_tied, rollout, "127.0.0.1", 8000, tensor_parallel_size=2, data_parallel_size=4
    )
    args = vllm_server_args.parse_args(argv[3:])
    assert (args.tensor_parallel_size, args.data_parallel_size) == (2, 4)
    assert args.gpu_memory_utilization == 0.85 and args.max_num_seqs == 32
    assert args.weight_transfer_config.backend == "nccl"
    gloo = RolloutConfig(dtype="float32", sync_backend="gloo")
    argv, _ = serve_command(tiny_tied, gloo, "127.0.0.1", 8000)
    assert vllm_server_args.parse_args(argv[3:]).weight_transfer_config.backend == "rlx_gloo"


def test_serve_on_a_cpu_leaves_gpu_memory_alone(tiny_tied, monkeypatch, vllm_server_args):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    argv, _ = serve_command(tiny_tied, RolloutConfig(dtype="float32"), "127.0.0.1", 8000)
    assert "--gpu-memory-utilization" not in argv and "--max-num-seqs" not in argv
    args = vllm_server_args.parse_args(argv[3:])
    assert args.weight_transfer_config.backend == "rlx_gloo"
    assert (args.tensor_parallel_size, args.data_parallel_size) == (1, 1)


def test_rlx_serve_reads_the_parallel_sizes_from_its_config(tiny_tied, monkeypatch):
    seen = {}
    monkeypatch.setattr(
        "rlx.cli.serve.serve", lambda model, rollout, host, port, **kw: seen.update(kw)
    )
    overrides = [f"model.name={tiny_tied}", "tensor_parallel_size=2", "data_parallel_size=3"]
    assert rlx_main(["serve", *overrides]) == 0
    assert seen == {"tensor_parallel_size": 2, "data_parallel_size": 3}
