"""Rollout engines: vLLM (default) and HF generate (fallback) behind one interface."""

from rlx.rollout.base import Completion, RolloutEngine, Sampling, encode_prompts

BACKENDS = ("vllm", "hf")


def make_engine(backend: str, model: str, rollout_cfg) -> RolloutEngine:
    """Build the engine named by `backend` from an rlx.config.RolloutConfig."""
    if backend == "vllm":
        from rlx.rollout.vllm_backend import VLLMEngine

        return VLLMEngine.from_config(model, rollout_cfg)
    if backend == "hf":
        from rlx.rollout.hf_backend import HFEngine

        return HFEngine.from_config(model, rollout_cfg)
    raise ValueError(f"unknown rollout backend {backend!r}: choose one of {BACKENDS}")


__all__ = ["BACKENDS", "Completion", "RolloutEngine", "Sampling", "encode_prompts", "make_engine"]
