"""Shared fixtures: tiny random models built in seconds (never downloaded), one `rlx serve` rollout
server for the session (started only by the tests that ask for it) and a free port. vLLM engines
are built by the tests that need them, not here."""

from __future__ import annotations

import os

import pytest

# vLLM reads these lazily; set them before any test imports it.
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory):
    """A 2-layer Llama-style model with untied embeddings."""
    from rlx.models.tiny import build_tiny_model

    return str(build_tiny_model(tmp_path_factory.mktemp("tiny_llama"), arch="llama"))


@pytest.fixture(scope="session")
def tiny_tied(tmp_path_factory):
    """A 2-layer Llama-style model whose lm_head is tied to the input embedding."""
    from rlx.models.tiny import build_tiny_model

    path = tmp_path_factory.mktemp("tiny_tied")
    return str(build_tiny_model(path, arch="llama", tie_embeddings=True))


@pytest.fixture(scope="session")
def tiny_qwen2(tmp_path_factory):
    """A 2-layer Qwen2-style model (attention biases, untied embeddings)."""
    from rlx.models.tiny import build_tiny_model

    return str(build_tiny_model(tmp_path_factory.mktemp("tiny_qwen2"), arch="qwen2"))


@pytest.fixture(scope="session")
def rollout_server(tiny_tied, tmp_path_factory):
    """`rlx serve` on tiny_tied in fp32, in its own process group: yields (address, process).
    Shared by every test that needs one; each test pushes the weights it expects first. It runs
    with a token (RLX_SERVE_TOKEN, set for this test session too), so every test that talks to
    it shows the trainer authenticating each call and the weight-sync group's check passing."""
    import secrets
    import signal
    import subprocess
    import sys
    import time

    import requests
    from torch.distributed.elastic.utils.distributed import get_free_port

    previous_token = os.environ.get("RLX_SERVE_TOKEN")
    os.environ["RLX_SERVE_TOKEN"] = previous_token or secrets.token_hex(16)
    port = get_free_port()
    log = tmp_path_factory.mktemp("rollout_server") / "server.log"
    cmd = [sys.executable, "-m", "rlx.cli", "serve", f"model.name={tiny_tied}", f"port={port}"]
    cmd += ["rollout.dtype=float32", "rollout.enable_lora=true", "rollout.max_loras=2"]
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=out, start_new_session=True)
    deadline = time.monotonic() + 240
    while True:
        try:
            if requests.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                break
        except requests.RequestException:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            os.killpg(proc.pid, signal.SIGKILL)
            pytest.fail(f"rlx serve did not start:\n{log.read_text()[-3000:]}")
        time.sleep(1)
    yield f"127.0.0.1:{port}", proc
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
    if previous_token is None:
        os.environ.pop("RLX_SERVE_TOKEN", None)


@pytest.fixture
def free_port() -> int:
    """A TCP port nobody listens on now, for a test's torch.distributed rendezvous."""
    from torch.distributed.elastic.utils.distributed import get_free_port

    return get_free_port()
