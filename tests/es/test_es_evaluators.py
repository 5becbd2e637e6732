"""The three population backends on a tiny model: each member's greedy completions equal HF
generation with explicitly merged weights W + E_m; the vLLM adapter-slot bug is kept away; the
in-place baseline restores the engine's weights exactly; an engine lacking what a backend needs is a
clear error."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from transformers import AutoModelForCausalLM

from rlx.algos.eggroll import NoiseSpec, evolved_parameters, perturbation
from rlx.es import generate_rows, make_evaluator, plan_population
from rlx.es.vllm_lora import engine_lora_rank
from rlx.rollout import Adapter, EngineUnsupported, Sampling, encode_prompts
from rlx.rollout.base import unsupported
from rlx.rollout.hf_backend import HFEngine
from rlx.rollout.vllm_backend import VLLMEngine

PROMPTS = ["Sam has 7 apples", [{"role": "user", "content": "What is 3 + 4?"}]]
GREEDY = Sampling(n=1, max_new_tokens=10, temperature=0.0)
SPEC = NoiseSpec(seed=1, sigma=0.05, rank=1)
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module")
def setup(tiny_llama):
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    params = evolved_parameters(model, TARGETS)
    engine = HFEngine(tiny_llama)
    return {
        "path": tiny_llama,
        "params": params,
        "tokenizer": engine.tokenizer,
        "ids": encode_prompts(engine.tokenizer, PROMPTS),
    }


def merged_greedy(setup, member: int, kind_spec=SPEC) -> list[list[int]]:
    """Reference: HF generate, one prompt at a time, with W + E_member written into the weights."""
    model = AutoModelForCausalLM.from_pretrained(setup["path"], dtype=torch.float32).eval()
    own = dict(model.named_parameters())
    with torch.no_grad():
        for name, p in setup["params"].items():
            own[name] += perturbation(kind_spec, name, p.shape, 0, member)
        out = []
        for ids in setup["ids"]:
            t = torch.tensor([ids])
            gen = model.generate(
                t,
                max_new_tokens=GREEDY.max_new_tokens,
                do_sample=False,
                pad_token_id=setup["tokenizer"].pad_token_id,
            )
            tokens = gen[0, len(ids) :].tolist()
            eos = setup["tokenizer"].eos_token_id
            out.append(tokens[: tokens.index(eos) + 1] if eos in tokens else tokens)
    return out


def by_member(completions, plan) -> dict[int, list[list[int]]]:
    out, i = {}, 0
    for m, prompts in zip(plan.members, plan.prompts, strict=True):
        out[m] = [completions[i + k].token_ids for k in range(len(prompts))]
        i += len(prompts)
    return out


def shapes(setup):
    return {n: tuple(p.shape) for n, p in setup["params"].items()}


def test_hf_batched_equals_merged_weights(setup):
    backend = make_evaluator(
        "hf_batched",
        model_name=setup["path"],
        noise=SPEC,
        shapes=shapes(setup),
        dtype="float32",
        members_per_batch=3,
    )
    plan = plan_population(4, 2, "all", [0, 1, 2, 3])
    got = by_member(backend.evaluate(setup["ids"], plan, 0, GREEDY), plan)
    for m in plan.members:
        assert got[m] == merged_greedy(setup, m), f"member {m}"
    assert got[0] != got[1]
    # frozen weights would make torch's CPU matmul expand lm_head per row in HF prefill (slow)
    assert all(p.requires_grad for p in backend.model.parameters())


def test_vllm_lora_equals_merged_weights_and_frees_slots(setup):
    engine = VLLMEngine(
        setup["path"],
        dtype="float32",
        max_model_len=256,
        enable_lora=True,
        max_loras=3,
        max_lora_rank=engine_lora_rank(SPEC.rank),
    )
    try:
        plain_before = [c.token_ids for c in engine.generate(PROMPTS, GREEDY)]
        backend = make_evaluator(
            "vllm_lora", engine=engine, noise=SPEC, shapes=shapes(setup), members_per_batch=2
        )
        plan = plan_population(6, 2, "all", list(range(6)))  # 6 adapters through 3 slots
        got = by_member(backend.evaluate(setup["ids"], plan, 0, GREEDY), plan)
        for m in (0, 1, 5):
            assert got[m] == merged_greedy(setup, m), f"member {m}"
        # adapter-slot bug: adapter-less requests after a population call must see the centre
        assert not engine.llm.llm_engine.list_loras()
        assert [c.token_ids for c in engine.generate(PROMPTS, GREEDY)] == plain_before
        with pytest.raises(ValueError, match="every prompt an adapter"):
            engine.generate_ids(setup["ids"], GREEDY, [backend.adapter(0, 0), None])
        with pytest.raises(ValueError, match="max_loras"):
            make_evaluator(
                "vllm_lora", engine=engine, noise=SPEC, shapes=shapes(setup), members_per_batch=3
            )
        backend.close()
    finally:
        engine.close()


def test_inplace_hf_restores_weights_exactly(setup):
    engine = HFEngine(setup["path"])
    before = {k: v.clone() for k, v in engine.model.state_dict().items()}
    full = NoiseSpec(seed=1, sigma=0.05, rank=1, kind="full_rank")
    backend = make_evaluator("inplace", engine=engine, noise=full, centre=setup["params"])
    plan = plan_population(2, 2, "all", [0, 1])
    got = by_member(backend.evaluate(setup["ids"], plan, 0, GREEDY), plan)
    assert got[1] == merged_greedy(setup, 1, full)
    after = engine.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_inplace_vllm_low_rank_equals_merged_and_restores(setup):
    engine = VLLMEngine(setup["path"], dtype="float32", max_model_len=256)
    try:
        ids = [1, 57, 210, 33, 99, 140, 260, 301]
        before = engine.prompt_logprobs([ids])[0]
        backend = make_evaluator("inplace", engine=engine, noise=SPEC, centre=setup["params"])
        plan = plan_population(2, 2, "all", [0, 1])
        got = by_member(backend.evaluate(setup["ids"], plan, 0, GREEDY), plan)
        assert got[0] == merged_greedy(setup, 0)
        assert engine.prompt_logprobs([ids])[0] == before  # the restore is a copy: bit-exact
        # an engine without LoRA cannot serve the vllm_lora backend
        with pytest.raises(EngineUnsupported, match="vllm.*es.evaluator=vllm_lora.*enable_lora"):
            make_evaluator("vllm_lora", engine=engine, noise=SPEC, shapes=shapes(setup))
    finally:
        engine.close()


def test_rows_are_generated_by_the_engine(setup):
    """Population rows go through the engine's own generation: the same tokens, text and stop
    handling as `generate`, the row's prompt index, no logprobs; ignore_eos fixes the length."""
    engine = HFEngine(setup["path"])
    sampling = Sampling(n=1, max_new_tokens=12, temperature=0.0, stop=["ooo", " sum"])
    ref = engine.generate(PROMPTS, sampling)
    got = generate_rows(engine, setup["ids"], [1, 0, 1], sampling)
    assert [c.prompt_index for c in got] == [1, 0, 1]
    for a, b in zip(got, [ref[1], ref[0], ref[1]], strict=True):
        assert (a.token_ids, a.text, a.finish_reason) == (b.token_ids, b.text, b.finish_reason)
        assert a.logprobs == []
    assert [c.finish_reason for c in got] == ["stop", "stop", "stop"]  # each hits a stop string
    fixed = dataclasses.replace(sampling, ignore_eos=True)
    assert all(len(c.token_ids) == 12 for c in generate_rows(engine, setup["ids"], [0, 1], fixed))
    with pytest.raises(ValueError, match="samples out as rows"):
        generate_rows(engine, setup["ids"], [0], dataclasses.replace(sampling, n=2))


class NoPerturbEngine(HFEngine):
    """An engine that cannot perturb its weights in place (as a server engine)."""

    def perturb_weights(self, named_tensors):
        raise unsupported("server", "perturb", "use es.evaluator=vllm_lora")

    restore_weights = perturb_weights


def test_an_engine_lacking_a_capability_is_a_clear_error(setup):
    """The error names the engine and the ES backend that needs what it lacks."""
    engine = HFEngine(setup["path"])
    with pytest.raises(EngineUnsupported, match="hf rollout engine .*es.evaluator=vllm_lora"):
        make_evaluator("vllm_lora", engine=engine, noise=SPEC, shapes=shapes(setup))
    with pytest.raises(EngineUnsupported, match="LoRA adapter per prompt"):
        engine.generate_ids(setup["ids"], GREEDY, [Adapter("a", "/nowhere")] * 2)
    server = NoPerturbEngine.from_model(engine.model, engine.tokenizer)
    backend = make_evaluator("inplace", engine=server, noise=SPEC, centre=setup["params"])
    plan = plan_population(2, 2, "all", [0, 1])
    with pytest.raises(EngineUnsupported, match="server rollout engine .*es.evaluator=inplace"):
        backend.evaluate(setup["ids"], plan, 0, GREEDY)


def test_low_rank_backends_reject_full_rank_noise(setup):
    full = NoiseSpec(seed=1, sigma=0.05, kind="full_rank")
    with pytest.raises(ValueError, match="inplace"):
        make_evaluator("hf_batched", model_name=setup["path"], noise=full, shapes=shapes(setup))
    with pytest.raises(ValueError, match="unknown population evaluator"):
        make_evaluator("jax", noise=SPEC)
