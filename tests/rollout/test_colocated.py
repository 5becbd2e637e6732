"""The in-process engine sharing a GPU with the trainer: rollout.gpu_memory_utilization and
rollout.sleep. vLLM has no sleep mode on CPU, so the bracketing (awake for every call that needs
the engine, asleep after it, also after a failure) is checked on a stand-in for vLLM's LLM; the
real engine on CPU refuses rollout.sleep with one line."""

from __future__ import annotations

import pytest

from rlx.config import ConfigError, PGConfig, load_config
from rlx.rollout import Sampling
from rlx.rollout.vllm_backend import VLLMEngine


class SleepyLLM:
    """Records the calls vLLM's LLM would get; generate fails when asleep."""

    def __init__(self, fail: bool = False):
        self.calls, self.asleep, self.fail = [], False, fail

    def sleep(self, level: int) -> None:
        self.calls.append(f"sleep{level}")
        self.asleep = True

    def wake_up(self) -> None:
        self.calls.append("wake")
        self.asleep = False

    def generate(self, requests, params, use_tqdm, lora_request):
        assert not self.asleep, "generate on a sleeping engine"
        self.calls.append("generate")
        if self.fail:
            raise RuntimeError("boom")
        return []

    def collective_rpc(self, fn, args):
        assert not self.asleep, "weights loaded into a sleeping engine"
        self.calls.append("load")

    def reset_prefix_cache(self) -> None:
        self.calls.append("reset")


def sleepy_engine(llm: SleepyLLM) -> VLLMEngine:
    engine = VLLMEngine.__new__(VLLMEngine)  # no real engine: vLLM cannot sleep on CPU
    engine.llm, engine.sleeps, engine._lora_ids, engine.weight_version = llm, True, {}, 0
    return engine


def test_a_sleeping_engine_wakes_for_each_call_and_sleeps_after():
    llm = SleepyLLM()
    engine = sleepy_engine(llm)
    engine.generate_ids([], Sampling(n=1, max_new_tokens=4))
    with engine.weight_update():  # one wake for all chunks of a sync
        engine.update_weights([])
        engine.update_weights([])
    assert engine.weight_version == 1
    assert llm.calls == [
        *("wake", "generate", "sleep1"),
        *("wake", "load", "reset", "load", "reset", "sleep1"),
    ]
    assert llm.asleep


def test_a_failed_call_still_puts_the_engine_back_to_sleep():
    llm = SleepyLLM(fail=True)
    with pytest.raises(RuntimeError, match="boom"):
        sleepy_engine(llm).generate_ids([], Sampling(n=1, max_new_tokens=4))
    assert llm.calls == ["wake", "generate", "sleep1"] and llm.asleep


def test_sleep_needs_the_in_process_engine():
    with pytest.raises(ConfigError, match="rollout.sleep"):
        load_config(PGConfig, overrides=["rollout.backend=hf", "rollout.sleep=true"])


def test_sleep_on_cpu_is_one_clear_error(tiny_llama):
    with pytest.raises(ConfigError, match="needs a GPU"):
        VLLMEngine(tiny_llama, dtype="float32", sleep=True)
