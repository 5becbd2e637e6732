"""Rollout engines: vLLM (default), HF generate (fallback) and rollout servers behind one interface.

`make_engine` builds one by the config's rollout.backend. None of the engine modules imports vLLM
at its top (they defer it to the engine's start), so importing this package does not load vLLM.
"""

from rlx.config.choices import ROLLOUT_BACKENDS as BACKENDS
from rlx.rollout.base import (
    Adapter,
    AdapterEngine,
    Completion,
    EngineUnsupported,
    LoRALimits,
    PerturbEngine,
    RolloutEngine,
    Sampling,
    ScoringEngine,
    encode_prompts,
    engine_dtype,
)
from rlx.rollout.hf_backend import HFEngine
from rlx.rollout.server import ServerEngine
from rlx.rollout.vllm_backend import VLLMEngine


def make_engine(
    backend: str, model: str, rollout_cfg, rank: int = 0, run_id: str | None = None
) -> RolloutEngine:
    """Build the engine named by `backend` from an rlx.config.RolloutConfig (`rank`: this
    trainer process's rank; with rollout servers only rank 0 sends weights, and the servers
    label the weights with `run_id`, rlx.recipe.Run.run_id)."""
    if backend == "vllm":
        return VLLMEngine.from_config(model, rollout_cfg)
    if backend == "hf":
        return HFEngine.from_config(model, rollout_cfg)
    if backend == "server":
        return ServerEngine.from_config(model, rollout_cfg, rank, run_id)
    raise ValueError(f"unknown rollout backend {backend!r}: choose one of {BACKENDS}")


__all__ = [
    "BACKENDS",
    "Adapter",
    "AdapterEngine",
    "Completion",
    "EngineUnsupported",
    "LoRALimits",
    "PerturbEngine",
    "RolloutEngine",
    "Sampling",
    "ScoringEngine",
    "encode_prompts",
    "engine_dtype",
    "make_engine",
]
