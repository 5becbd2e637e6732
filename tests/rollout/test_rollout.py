"""The rollout layer on real engines: vLLM (in-process, CPU) and the HF generate fallback."""

from __future__ import annotations

import gc

import pytest
import torch
from transformers import AutoModelForCausalLM

from rlx.rollout import EngineUnsupported, Sampling, encode_prompts
from rlx.rollout.hf_backend import HFEngine
from rlx.rollout.vllm_backend import VLLMEngine

CHAT = [{"role": "user", "content": "Sam has 7 apples. How many?"}]
FIXED_TOKENS = [1, 57, 210, 33, 99, 140, 260, 301, 12, 88, 402, 7, 150, 3, 45, 2]


def hf_logprobs(model, ids: list[int]) -> torch.Tensor:
    """Reference: log p(t_i | t_<i) from a plain HF forward in fp32."""
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0, :-1].float()
    return torch.log_softmax(logits, -1).gather(-1, torch.tensor(ids[1:])[:, None])[:, 0]


def perturbed_state_dict(model_dir: str, seed: int = 1, scale: float = 0.05):
    """The model's weights plus seeded noise (every tensor, embeddings included)."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * scale)
    return model


@pytest.fixture(scope="module")
def vllm_fp32(tiny_tied):
    engine = VLLMEngine(tiny_tied, dtype="float32", max_model_len=256, kv_cache_gib=1)
    yield engine
    engine.close()


def test_vllm_generate_shapes_and_logprobs(vllm_fp32):
    sampling = Sampling(n=3, max_new_tokens=12, temperature=1.0)
    out = vllm_fp32.generate([CHAT, "Hello world"], sampling)
    assert [c.prompt_index for c in out] == [0, 0, 0, 1, 1, 1]
    for c in out:
        assert 1 <= len(c.token_ids) <= 12
        assert len(c.logprobs) == len(c.token_ids)
        assert all(lp <= 0 for lp in c.logprobs)
        assert c.finish_reason in ("stop", "length")
    assert out[0].prompt_token_ids == encode_prompts(vllm_fp32.tokenizer, [CHAT])[0]


def test_vllm_sampler_logprobs_match_hf_forward(vllm_fp32, tiny_tied):
    """At temperature 1 the sampler's logprobs are the model's: check them against HF."""
    out = vllm_fp32.generate(["Sam has"], Sampling(n=2, max_new_tokens=10))
    model = AutoModelForCausalLM.from_pretrained(tiny_tied, dtype=torch.float32)
    for c in out:
        ref = hf_logprobs(model, c.prompt_token_ids + c.token_ids)[-len(c.token_ids) :]
        assert torch.allclose(torch.tensor(c.logprobs), ref, atol=1e-4)


def test_vllm_weight_sync_is_exact_with_tied_embeddings(vllm_fp32, tiny_tied):
    """After pushing perturbed weights (tied embedding included) vLLM agrees with HF to 1e-4."""
    model = perturbed_state_dict(tiny_tied)
    ref = hf_logprobs(model, FIXED_TOKENS)
    before = torch.tensor(vllm_fp32.prompt_logprobs([FIXED_TOKENS])[0])
    assert (before - ref).abs().max() > 1e-2, "the perturbation should change the logprobs"
    vllm_fp32.update_weights(model.state_dict().items())
    after = torch.tensor(vllm_fp32.prompt_logprobs([FIXED_TOKENS])[0])
    assert (after - ref).abs().max() <= 1e-4
    # generation sees the new weights too (not a stale prefix cache)
    c = vllm_fp32.generate(["Sam has"], Sampling(n=1, max_new_tokens=8))[0]
    gen_ref = hf_logprobs(model, c.prompt_token_ids + c.token_ids)[-len(c.token_ids) :]
    assert torch.allclose(torch.tensor(c.logprobs), gen_ref, atol=1e-4)


def test_vllm_stop_string_and_greedy(vllm_fp32):
    greedy = Sampling(n=1, max_new_tokens=16, temperature=0.0)
    a = vllm_fp32.generate(["The answer is"], greedy)[0]
    b = vllm_fp32.generate(["The answer is"], greedy)[0]
    assert a.token_ids == b.token_ids
    stop = a.text[2:6]
    if stop.strip():
        c = vllm_fp32.generate(
            ["The answer is"], Sampling(n=1, max_new_tokens=16, temperature=0.0, stop=[stop])
        )[0]
        assert c.text.endswith(stop) and c.finish_reason == "stop"
        assert len(c.text) < len(a.text)


def test_vllm_generate_ids_options(vllm_fp32):
    """Token-id prompts give what `generate` gives; ignore_eos fixes the length; logprobs=False
    leaves them out."""
    greedy = Sampling(n=1, max_new_tokens=12, temperature=0.0)
    ids = encode_prompts(vllm_fp32.tokenizer, [CHAT, "Hello world"])
    ref = vllm_fp32.generate([CHAT, "Hello world"], greedy)
    got = vllm_fp32.generate_ids(ids, greedy)
    assert [(c.token_ids, c.text, c.logprobs) for c in got] == [
        (c.token_ids, c.text, c.logprobs) for c in ref
    ]
    fixed = Sampling(n=1, max_new_tokens=12, temperature=0.0, ignore_eos=True, logprobs=False)
    out = vllm_fp32.generate_ids(ids, fixed)
    assert all(len(c.token_ids) == 12 and c.logprobs == [] for c in out)
    assert all(c.finish_reason == "length" for c in out)


def test_greedy_with_several_samples_is_rejected(vllm_fp32):
    with pytest.raises(ValueError, match="identical completions"):
        vllm_fp32.generate(["x"], Sampling(n=2, temperature=0.0))


def test_hf_and_vllm_greedy_agree(tiny_qwen2):
    """Both backends, same prompts, same weights, fp32: the same greedy tokens."""
    greedy = Sampling(n=1, max_new_tokens=12, temperature=0.0)
    prompts = [CHAT, "Mia had 14 pencils"]
    hf = HFEngine(tiny_qwen2, dtype="float32")
    hf_out = hf.generate(prompts, greedy)
    engine = VLLMEngine(tiny_qwen2, dtype="float32", max_model_len=256, kv_cache_gib=1)
    try:
        v_out = engine.generate(prompts, greedy)
    finally:
        engine.close()
    for h, v in zip(hf_out, v_out, strict=True):
        assert h.prompt_token_ids == v.prompt_token_ids
        assert h.token_ids == v.token_ids
        assert torch.allclose(torch.tensor(h.logprobs), torch.tensor(v.logprobs), atol=1e-3)


def test_hf_engine_sampling_and_weight_update(tiny_llama):
    engine = HFEngine(tiny_llama, dtype="float32", batch_size=4)
    out = engine.generate([CHAT, "Hello", "Sam"], Sampling(n=2, max_new_tokens=6))
    assert [c.prompt_index for c in out] == [0, 0, 1, 1, 2, 2]
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    for c in out:
        ref = hf_logprobs(model, c.prompt_token_ids + c.token_ids)[-len(c.token_ids) :]
        assert torch.allclose(torch.tensor(c.logprobs), ref, atol=1e-4)
    new = perturbed_state_dict(tiny_llama)
    engine.update_weights(new.state_dict().items())
    got = torch.tensor(engine.prompt_logprobs([FIXED_TOKENS])[0])
    assert torch.allclose(got, hf_logprobs(new, FIXED_TOKENS), atol=1e-5)
    with pytest.raises(KeyError, match="no parameter named"):
        engine.update_weights([("model.nope.weight", torch.zeros(1))])


def test_hf_engine_generate_ids_options(tiny_llama):
    """As for vLLM: token ids = `generate`, fixed length with ignore_eos, optional logprobs; and
    per-prompt adapters are a clear error naming the engine and the ES backend."""
    engine = HFEngine(tiny_llama, dtype="float32", batch_size=1)
    greedy = Sampling(n=1, max_new_tokens=12, temperature=0.0)
    ids = encode_prompts(engine.tokenizer, [CHAT, "Hello world"])
    ref = engine.generate([CHAT, "Hello world"], greedy)
    assert engine.generate_ids(ids, greedy) == ref
    fixed = Sampling(n=1, max_new_tokens=12, temperature=0.0, ignore_eos=True, logprobs=False)
    out = engine.generate_ids(ids, fixed)
    assert all(len(c.token_ids) == 12 and c.logprobs == [] for c in out)
    assert all(c.finish_reason == "length" for c in out)
    with pytest.raises(EngineUnsupported, match="hf rollout engine.*es.evaluator=vllm_lora"):
        engine.lora_limits()


def test_bad_prompt_type_names_the_prompt(tiny_llama):
    engine = HFEngine(tiny_llama)
    with pytest.raises(TypeError, match="prompt 1 is a int"):
        engine.generate(["ok", 5], Sampling())


def test_vllm_bf16_sync_round_trip_is_bit_exact(tiny_tied):
    """bf16 engine: push perturbed weights, then the originals: logprobs return exactly.

    HF fp32 cannot be the reference in bf16 (rounding differs), but the engine's own start-up
    logprobs can: any weight copy the sync missed (a stale packed lm_head) would show here.
    """
    original = AutoModelForCausalLM.from_pretrained(tiny_tied, dtype=torch.float32)
    engine = VLLMEngine(tiny_tied, dtype="bfloat16", max_model_len=256, kv_cache_gib=1)
    try:
        start = torch.tensor(engine.prompt_logprobs([FIXED_TOKENS])[0])
        engine.update_weights(perturbed_state_dict(tiny_tied).state_dict().items())
        moved = torch.tensor(engine.prompt_logprobs([FIXED_TOKENS])[0])
        engine.update_weights(original.state_dict().items())
        back = torch.tensor(engine.prompt_logprobs([FIXED_TOKENS])[0])
    finally:
        engine.close()
    assert (moved - start).abs().max() > 1e-2
    assert torch.equal(back, start)


def _parallel_state_initialized() -> bool:
    from vllm.distributed import parallel_state

    return parallel_state.model_parallel_is_initialized()


def test_failed_engines_leave_the_process_ready_for_the_next(tmp_path, tiny_tied):
    """An engine that fails to start (corrupt weights) or to run (a failing forward) resets vLLM's
    process state itself, so the next engine in this process works, also while the failures'
    tracebacks (and the engines in their frames) are still alive, as a test runner keeps them."""
    import shutil

    corrupt = tmp_path / "corrupt"
    shutil.copytree(tiny_tied, corrupt)
    weights = corrupt / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(Exception, match="safetensors|deserializ|header") as failed_start:
        VLLMEngine(str(corrupt), dtype="float32", max_model_len=256)
    assert not _parallel_state_initialized()

    engine = VLLMEngine(tiny_tied, dtype="float32", max_model_len=256)
    core = engine.llm.llm_engine.engine_core.engine_core

    def broken_forward(*args, **kwargs):
        raise RuntimeError("injected kernel failure")

    core.model_executor.execute_model = broken_forward
    with pytest.raises(RuntimeError, match="injected kernel failure") as failed_run:
        engine.generate(["Sam has"], Sampling(n=1, max_new_tokens=4))
    engine.close()
    engine.close()  # closing twice is harmless
    assert not _parallel_state_initialized(), "a failed engine left vLLM's parallel groups behind"

    good = VLLMEngine(tiny_tied, dtype="float32", max_model_len=256)
    try:
        del failed_start, failed_run
        gc.collect()  # the failed engines are collected while the good one runs
        ref = hf_logprobs(AutoModelForCausalLM.from_pretrained(tiny_tied), FIXED_TOKENS)
        got = torch.tensor(good.prompt_logprobs([FIXED_TOKENS])[0])
        assert (got - ref).abs().max() <= 1e-4
        assert len(good.generate(["Sam has"], Sampling(n=2, max_new_tokens=4))) == 2
    finally:
        good.close()
