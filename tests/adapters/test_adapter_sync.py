"""adapter.sync=adapter: the engine serves the trainer's adapter through LoRA requests, a new
version per sync; the methods vLLM refuses merge instead; the config names what the engine needs."""

from __future__ import annotations

import pytest
import torch

from rlx.adapters import adapter_sync_fallback
from rlx.config import AdapterConfig, ConfigError, PGConfig, load_config
from rlx.config.adapter import ENGINE_ADAPTERS
from rlx.rollout import Sampling
from rlx.weight_sync import AdapterSync, MergedSync, weight_sync

FIXED_TOKENS = [1, 57, 210, 33, 99, 140, 260, 301, 12, 88, 402, 7, 150, 3, 45, 2]


@torch.no_grad()
def trainer_logprobs(model, ids: list[int]) -> torch.Tensor:
    """log p(t_i | t_<i), i >= 1, from the trainer's (PEFT) model in fp32."""
    logits = model(input_ids=torch.tensor([ids])).logits[0, :-1].float()  # [T-1, V]
    return torch.log_softmax(logits, -1).gather(-1, torch.tensor(ids[1:])[:, None])[:, 0]


def test_vllm_serves_the_synced_adapter_with_the_trainers_logprobs(
    tiny_llama, tmp_path, policy, train
):
    from rlx.rollout.vllm_backend import VLLMEngine

    cfg = AdapterConfig(method="lora", rank=8, sync="adapter")
    model = policy(cfg)
    engine = VLLMEngine(
        tiny_llama, dtype="float32", max_model_len=256, enable_lora=True, max_lora_rank=8
    )
    weights = weight_sync(engine, cfg, tmp_path / "sync")
    assert isinstance(weights, AdapterSync)
    served = weights.engine
    try:
        for version in (1, 2):  # each update a new version: vLLM must load the new weights
            train(model, cfg, steps=1, lr=1e-2, seed=version)
            ref = trainer_logprobs(model, FIXED_TOKENS)
            stale = torch.tensor(served.prompt_logprobs([FIXED_TOKENS])[0])
            assert (stale - ref).abs().max() > 1e-2, "the update should change the logprobs"
            weights.push(model, version)
            got = torch.tensor(served.prompt_logprobs([FIXED_TOKENS])[0])
            assert (got - ref).abs().max() <= 1e-4
            c = served.generate(["Sam has"], Sampling(n=2, max_new_tokens=8))[0]
            sampled = trainer_logprobs(model, c.prompt_token_ids + c.token_ids)
            assert torch.allclose(torch.tensor(c.logprobs), sampled[-len(c.token_ids) :], atol=1e-4)
        assert [p.name for p in (tmp_path / "sync").iterdir()] == ["rlx-rank0-v2"]
    finally:
        served.close()


@pytest.mark.parametrize("method", ["lora", "mica", "dora", "pissa"])
def test_vllm_accepts_exactly_the_adapters_we_sync(method, policy, tmp_path):
    """vLLM's own check (its PEFTHelper) on PEFT's saved adapter agrees with ENGINE_ADAPTERS for
    the methods it judges (minor, adalora, miss fall back for reasons it cannot see)."""
    from vllm.lora.peft_helper import PEFTHelper

    policy(AdapterConfig(method=method, rank=4)).save_pretrained(str(tmp_path))
    refusals = PEFTHelper.from_local_dir(str(tmp_path), None)._validate_features()
    assert (not refusals) == (method in ENGINE_ADAPTERS), refusals
    fallback = adapter_sync_fallback(AdapterConfig(method=method, rank=4, sync="adapter"))
    assert (fallback is None) == (method in ENGINE_ADAPTERS)


def test_adapter_sync_config_names_what_the_engine_needs(capsys):
    def cfg(**extra):
        base = {"adapter.method": "lora", "adapter.rank": 16, "adapter.sync": "adapter"}
        return load_config(PGConfig, overrides=[f"{k}={v}" for k, v in (base | extra).items()])

    with pytest.raises(
        ConfigError, match="rollout.enable_lora=true and rollout.max_lora_rank >= 16"
    ):
        cfg(**{"rollout.enable_lora": "true", "rollout.max_lora_rank": 8})
    with pytest.raises(ConfigError, match="rollout.backend=vllm or server"):
        cfg(**{"rollout.backend": "hf"})
    with pytest.raises(ConfigError, match="sync must be merged with method none"):
        cfg(**{"adapter.method": "none"})
    ok = cfg(**{"rollout.enable_lora": "true", "rollout.max_lora_rank": 16})
    assert ok.adapter.sync == "adapter"
    dora = cfg(**{"adapter.method": "dora"})  # merged instead: the engine needs no LoRA
    engine = object()
    merged = weight_sync(engine, dora.adapter, "unused")
    assert isinstance(merged, MergedSync) and merged.engine is engine
    assert "DoRA" in capsys.readouterr().out
