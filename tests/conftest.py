"""Shared fixtures: tiny random models built in seconds (never downloaded) and one vLLM engine."""

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


@pytest.fixture
def free_port() -> int:
    """A TCP port nobody listens on now, for a test's torch.distributed rendezvous."""
    from torch.distributed.elastic.utils.distributed import get_free_port

    return get_free_port()
