"""Authenticated rollout servers: `rlx serve` refuses to bind beyond loopback without a token, its
middleware answers 401 to every path but /health without it (a tiny ASGI app, then the real
server), the weight-sync group refuses a member without it, and adapters travel to the server
with the load request."""

from __future__ import annotations

import json
import os
import shutil
import threading
from types import SimpleNamespace

import pytest
import requests
import torch
from starlette.testclient import TestClient

from rlx.cli import main as rlx_main
from rlx.cli.serve import serve_command
from rlx.config import RolloutConfig
from rlx.errors import UserError
from rlx.rollout.adapter_upload import AdapterUploadMiddleware, adapter_payload
from rlx.rollout.auth import TOKEN_ENV, TokenMiddleware, membership_proof
from rlx.rollout.gloo_worker import GlooInitInfo, GlooWeightTransferEngine
from rlx.rollout.server import ServerEngine
from rlx.rollout.weight_transfer import GlooSender, RolloutWorkerError, SyncAuthError, broadcast

GUARDED = [
    ("POST", "/collective_rpc"),
    ("POST", "/pause"),
    ("POST", "/update_weights"),
    ("POST", "/v1/load_lora_adapter"),
    ("POST", "/inference/v1/generate"),
    ("POST", "/init_weight_transfer_engine"),
    ("GET", "/v1/models"),
]


async def echo_app(scope, receive, send):
    """An ASGI app that answers 200 with the path it was asked for (or ignores lifespan)."""
    if scope["type"] != "http":
        return
    body = json.dumps({"path": scope["path"]}).encode()
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": body})


def test_the_middleware_wants_the_token_on_every_path_but_health():
    client = TestClient(TokenMiddleware(echo_app, token="s3cret"))
    for method, path in GUARDED:
        assert client.request(method, path).status_code == 401, path
        wrong = {"Authorization": "Bearer s3cret-not"}
        assert client.request(method, path, headers=wrong).status_code == 401, path
        right = {"Authorization": "Bearer s3cret"}
        assert client.request(method, path, headers=right).json() == {"path": path}
    assert client.get("/health").status_code == 200
    assert client.get("/health/../collective_rpc").status_code == 401  # no prefix tricks


def test_binding_beyond_loopback_needs_a_token(tiny_tied, monkeypatch, capsys):
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    with pytest.raises(UserError, match="RLX_SERVE_TOKEN"):
        serve_command(tiny_tied, RolloutConfig(), "0.0.0.0", 8123)
    status = rlx_main(["serve", f"model.name={tiny_tied}", "host=0.0.0.0"])
    err = capsys.readouterr().err.strip()
    assert status == 2 and "\n" not in err and "needs a token" in err
    argv, env = serve_command(tiny_tied, RolloutConfig(), "127.0.0.1", 8123)  # loopback: fine
    assert "rlx.rollout.auth.TokenMiddleware" not in argv

    monkeypatch.setenv(TOKEN_ENV, "from-the-env")
    argv, env = serve_command(tiny_tied, RolloutConfig(enable_lora=True), "0.0.0.0", 8123)
    assert env[TOKEN_ENV] == "from-the-env" and "from-the-env" not in " ".join(argv)
    middleware = [argv[i + 1] for i, a in enumerate(argv) if a == "--middleware"]
    # vLLM makes the last one the outermost: the token guards the upload route too
    assert middleware[-1] == "rlx.rollout.auth.TokenMiddleware"
    assert "rlx.rollout.adapter_upload.AdapterUploadMiddleware" in middleware
    argv, env = serve_command(tiny_tied, RolloutConfig(token="knob"), "0.0.0.0", 8123)
    assert env[TOKEN_ENV] == "knob" and "knob" not in argv  # rollout.token wins over the env


def test_adapter_files_travel_with_the_load_request(tmp_path):
    """The upload route writes the files to the server's own folder, hands vLLM's load endpoint
    that folder, and the unload deletes it; a name with a path in it is refused."""
    calls = []

    async def vllm(scope, receive, send):
        message = await receive()
        calls.append((scope["path"], json.loads(message["body"])))
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "adapter_config.json").write_text('{"r": 4}')
    (tmp_path / "mine" / "adapter_model.safetensors").write_bytes(b"\x00\x01weights")
    client = TestClient(AdapterUploadMiddleware(vllm, root=str(tmp_path / "server")))
    answer = client.post("/rlx/load_lora_adapter", json=adapter_payload("m-0", tmp_path / "mine"))
    assert answer.status_code == 200 and answer.text == "ok"
    path, body = calls[-1]
    served = tmp_path / "server" / "m-0"
    assert path == "/v1/load_lora_adapter" and body == {
        "lora_name": "m-0",
        "lora_path": str(served),
    }
    assert (served / "adapter_model.safetensors").read_bytes() == b"\x00\x01weights"
    assert client.post("/v1/unload_lora_adapter", json={"lora_name": "m-0"}).status_code == 200
    assert calls[-1] == ("/v1/unload_lora_adapter", {"lora_name": "m-0"}) and not served.exists()
    for name, files in [("../evil", {"a": ""}), ("ok", {"../../x": ""}), ("ok", {})]:
        bad = client.post("/rlx/load_lora_adapter", json={"lora_name": name, "files": files})
        assert bad.status_code == 400, (name, files)
    assert len(calls) == 2 and not (tmp_path / "evil").exists()


def gloo_worker(rank: int, world: int, sender: GlooSender, out: dict) -> None:
    """rlx_gloo's worker side, as a server's worker runs it (`init_transfer_engine`), with the
    token of this process's RLX_SERVE_TOKEN."""
    worker = GlooWeightTransferEngine.__new__(GlooWeightTransferEngine)
    worker.group = None
    worker.parallel_config = SimpleNamespace(world_size=1, rank=0, data_parallel_index=0)
    info = GlooInitInfo(**sender.init_info(rank, world, 30.0))
    try:
        worker.init_transfer_engine(info)
        received = torch.zeros(4)
        broadcast(worker.group, received)
        out[rank] = received
        worker.shutdown()
    except Exception as err:  # handed to the test
        out[rank] = err


@pytest.mark.parametrize("worker_token", ["s3cret", "", "guessed"])
def test_a_peer_without_the_token_cannot_join_the_sync_group(worker_token, monkeypatch):
    """Trainer (rank 0) and one server worker (rank 1) over gloo: with the trainer's token the
    weights arrive; with another or none, both sides refuse the group before any weight."""
    monkeypatch.setenv(TOKEN_ENV, worker_token)  # what `rlx serve` gives its workers
    sender = GlooSender("127.0.0.1", 0, token="s3cret")
    out: dict = {}
    thread = threading.Thread(target=gloo_worker, args=(1, 2, sender, out), daemon=True)
    thread.start()
    try:
        if worker_token == "s3cret":
            sender.open(2, 30.0)
            sender.send([torch.arange(4.0)], ["float32"])
            thread.join(30)
            assert torch.equal(out[1], torch.arange(4.0))
        else:
            with pytest.raises(SyncAuthError, match="rank 1 did not prove the trainer's token"):
                sender.open(2, 30.0)
            thread.join(30)
            assert isinstance(out[1], SyncAuthError) and "rank 0" in str(out[1])
    finally:
        sender.close()


def test_membership_proofs_are_bound_to_token_challenge_and_rank():
    proof = membership_proof("t", b"c" * 32, 1)
    assert proof == membership_proof("t", b"c" * 32, 1)
    assert proof not in {
        membership_proof("u", b"c" * 32, 1),
        membership_proof("t", b"d" * 32, 1),
        membership_proof("t", b"c" * 32, 2),
    }


def test_a_real_server_wants_the_token(rollout_server, tiny_tied):
    """`rlx serve` with a token (the shared fixture runs with one): 401 without it on the RL,
    adapter and generate endpoints, /health open; with it, the same server answers."""
    base = f"http://{rollout_server[0]}"
    for method, path in GUARDED + [("POST", "/rlx/load_lora_adapter")]:
        answer = requests.request(method, base + path, json={}, timeout=30)
        assert answer.status_code == 401, (path, answer.text[:200])
    assert requests.get(base + "/health", timeout=30).status_code == 200
    token = {"Authorization": f"Bearer {os.environ[TOKEN_ENV]}"}
    assert requests.get(base + "/v1/models", headers=token, timeout=30).status_code == 200
    with pytest.raises(
        RolloutWorkerError, match=r"refused the call .* \(HTTP 401\): set rollout.token"
    ):
        ServerEngine(tiny_tied, [rollout_server[0]], timeout_s=30, token="not-the-token")


def test_adapters_reach_a_server_that_cannot_read_the_trainers_folder(
    rollout_server, tiny_tied, tmp_path
):
    """The trainer's adapter folder is deleted right after the load request: the server lists a
    copy of its own as the adapter's root (on the old code: the trainer's folder), generates
    with it, and the unload deletes that copy."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from rlx.rollout import Adapter, Sampling
    from rlx.rollout.server import ServerEngine

    base = AutoModelForCausalLM.from_pretrained(tiny_tied, dtype=torch.float32)
    peft = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"]))
    peft.save_pretrained(tmp_path / "adapter")
    engine = ServerEngine(tiny_tied, [rollout_server[0]], timeout_s=60, enable_lora=True)
    try:
        engine._load_adapters([Adapter("moved", str(tmp_path / "adapter"))], 1)
        shutil.rmtree(tmp_path / "adapter")
        served = engine.servers[0].call("listing", "GET", "/v1/models")["data"]
        root = next(m["root"] for m in served if m["id"] == "moved")
        assert not root.startswith(str(tmp_path)) and os.path.isdir(root)
        out = engine.generate_ids(
            [[1, 57, 210]], Sampling(n=1, max_new_tokens=4), [Adapter("moved", "")]
        )
        assert len(out[0].token_ids) >= 1
        engine.remove_adapters()
        assert not os.path.exists(root)
    finally:
        engine.close()
