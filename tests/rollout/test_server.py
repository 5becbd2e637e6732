"""Rollout servers (rollout.backend=server): `rlx serve` for real, the HTTP engine, the gloo weight
sync through vLLM's weight-transfer API, and the errors of a hung or missing server."""

from __future__ import annotations

import os
import signal
import time

import pytest
import torch
from test_rollout import FIXED_TOKENS, hf_logprobs, perturbed_state_dict
from torch.distributed.elastic.utils.distributed import get_free_port
from transformers import AutoModelForCausalLM

from rlx.cli.serve import exposure_warning, serve_command
from rlx.config import ConfigError, RolloutConfig
from rlx.rollout import EngineUnsupported, Sampling
from rlx.rollout.base import Adapter
from rlx.rollout.server import RolloutWorkerError, ServerEngine


@pytest.fixture
def engine(rollout_server, tiny_tied):
    """A server engine whose server holds tiny_tied's own weights (earlier tests may have moved
    them)."""
    address, _ = rollout_server
    engine = ServerEngine(tiny_tied, [address], timeout_s=60)
    original = AutoModelForCausalLM.from_pretrained(tiny_tied, dtype=torch.float32)
    engine.update_weights(original.state_dict().items())
    yield engine
    engine.close()


def test_serve_command_uses_the_in_process_engine_settings(tiny_tied):
    rollout = RolloutConfig(dtype="float32", max_model_len=256, seed=3)
    argv, env = serve_command(tiny_tied, rollout, "127.0.0.1", 8123)
    args = " ".join(argv)
    assert "--logprobs-mode processed_logprobs" in args  # the learners' importance weights
    assert "--dtype float32" in args and "--seed 3" in args and "--block-size 32" in args
    assert '--weight-transfer-config {"backend": "rlx_gloo"}' in args
    assert "--enable-scale-out" in args  # the token-in / token-out endpoint
    assert env["VLLM_SERVER_DEV_MODE"] == "1" and "VLLM_ENABLE_V1_MULTIPROCESSING" not in env
    assert exposure_warning("127.0.0.1") is None and exposure_warning("localhost") is None
    assert "collective_rpc" in exposure_warning("0.0.0.0")


def test_server_backend_needs_servers():
    with pytest.raises(ConfigError, match="servers"):
        RolloutConfig(backend="server")
    with pytest.raises(ConfigError, match="servers"):
        RolloutConfig(backend="server", servers=["no-port"])


def test_completions_keep_prompt_order_and_the_models_logprobs(engine, tiny_tied):
    """Several prompts in flight at once come back in prompt order, each with its own prompt ids,
    and at temperature 1 the sampler's logprobs are the model's (checked against HF)."""
    prompts = ["Sam has", "Hello world", "What is 2+2?", "Once upon"]
    out = engine.generate(prompts, Sampling(n=2, max_new_tokens=8))
    assert [c.prompt_index for c in out] == [0, 0, 1, 1, 2, 2, 3, 3]
    ids = [engine.tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    model = AutoModelForCausalLM.from_pretrained(tiny_tied, dtype=torch.float32)
    for c in out:
        assert c.prompt_token_ids == ids[c.prompt_index]
        assert c.weight_version == engine.weight_version
        ref = hf_logprobs(model, c.prompt_token_ids + c.token_ids)[-len(c.token_ids) :]
        assert torch.allclose(torch.tensor(c.logprobs), ref, atol=1e-4)


def test_prompts_split_across_servers_come_back_in_order(rollout_server, tiny_tied):
    """Two entries in rollout.servers (here the same server twice): the prompts go to the less
    loaded of the two, and the completions still come back in prompt order, each sampled from
    its own prompt (its logprobs are the server's scores of prompt + completion)."""
    address, _ = rollout_server
    engine = ServerEngine(tiny_tied, [address, address], timeout_s=60)
    try:
        prompts = [[1, 57, 210], [1, 99], [1, 140, 260, 301], [1, 12, 88], [1, 402]]
        out = engine.generate_ids(prompts, Sampling(n=2, max_new_tokens=5))
        assert [c.prompt_index for c in out] == [i for i in range(5) for _ in range(2)]
        assert [c.prompt_token_ids for c in out] == [p for p in prompts for _ in range(2)]
        assert all(s.peak_in_flight > 0 for s in engine.servers)  # both entries served
        scored = engine.prompt_logprobs([c.prompt_token_ids + c.token_ids for c in out])
        for c, lp in zip(out, scored, strict=True):
            assert torch.allclose(
                torch.tensor(c.logprobs), torch.tensor(lp[-len(c.token_ids) :]), atol=1e-4
            )
    finally:
        engine.close()


def test_chunked_weight_sync_is_exact_and_versioned(engine, tiny_tied):
    """Weights pushed in two chunks of whole layers (as under ZeRO-3) through the gloo engine:
    afterwards the server's logprobs equal an HF forward of the new weights (fp32, 1e-4; the
    embedding is tied to lm_head), and new completions carry the next weight version."""
    model = perturbed_state_dict(tiny_tied)
    ref = hf_logprobs(model, FIXED_TOKENS)
    before = torch.tensor(engine.prompt_logprobs([FIXED_TOKENS])[0])
    assert (before - ref).abs().max() > 1e-2, "the perturbation should change the logprobs"
    state = list(model.state_dict().items())
    first = [(n, t) for n, t in state if n.startswith("model.layers.0.")]
    rest = [(n, t) for n, t in state if not n.startswith("model.layers.0.")]
    version = engine.weight_version
    with engine.weight_update():
        engine.update_weights(first)
        engine.update_weights(rest)
    assert engine.weight_version == version + 1
    served = engine.servers[0].call("reading its version", "GET", "/weight_info")
    assert served["weight_version"] == f"{engine.run_id}:{version + 1}"  # the run's, the step
    after = torch.tensor(engine.prompt_logprobs([FIXED_TOKENS])[0])
    assert (after - ref).abs().max() <= 1e-4
    c = engine.generate(["Sam has"], Sampling(n=1, max_new_tokens=8))[0]
    assert c.weight_version == version + 1
    gen_ref = hf_logprobs(model, c.prompt_token_ids + c.token_ids)[-len(c.token_ids) :]
    assert torch.allclose(torch.tensor(c.logprobs), gen_ref, atol=1e-4)


def test_a_hung_server_gives_one_error_within_the_timeout(rollout_server, tiny_tied):
    address, proc = rollout_server
    engine = ServerEngine(tiny_tied, [address], timeout_s=3)
    os.kill(proc.pid, signal.SIGSTOP)  # the HTTP front end stops answering
    try:
        start = time.monotonic()
        with pytest.raises(RolloutWorkerError, match=f"{address}.*within.*generating"):
            engine.generate(["Sam has"], Sampling(n=1, max_new_tokens=4))
        assert time.monotonic() - start < 10
    finally:
        os.kill(proc.pid, signal.SIGCONT)
        engine.close()


def test_a_server_with_a_shorter_context_is_refused(rollout_server, tiny_tied):
    with pytest.raises(RolloutWorkerError, match="max_model_len=1024, below rollout.max_model_len"):
        ServerEngine(tiny_tied, [rollout_server[0]], timeout_s=30, max_model_len=4096)


def test_a_missing_server_is_named(rollout_server, tiny_tied):
    dead = f"127.0.0.1:{get_free_port()}"
    with pytest.raises(RolloutWorkerError, match=f"{dead} was not ready within"):
        ServerEngine(tiny_tied, [dead], timeout_s=2)
    engine = ServerEngine(tiny_tied, [rollout_server[0]], timeout_s=5)
    engine.servers[0].url = f"http://{dead}"  # as if the server died after the trainer started
    with pytest.raises(RolloutWorkerError, match=f"{dead} is unreachable while generating"):
        engine.generate(["Sam has"], Sampling(n=1, max_new_tokens=4))
    with pytest.raises(EngineUnsupported, match="server rollout engine cannot perturb"):
        engine.perturb_weights([])
    engine.close()


def test_adapters_load_through_the_servers_lora_endpoint(rollout_server, tiny_tied, tmp_path):
    """ES on servers: one LoRA adapter per prompt, loaded with vLLM's /v1/load_lora_adapter; at
    temperature 1 the logprobs are those of the HF model with the adapter merged (fp32, 1e-4)."""
    from peft import LoraConfig, get_peft_model

    from rlx.rollout import Adapter

    base = AutoModelForCausalLM.from_pretrained(tiny_tied, dtype=torch.float32)
    peft = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in peft.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    peft.save_pretrained(tmp_path / "adapter")
    merged = peft.merge_and_unload()

    engine = ServerEngine(
        tiny_tied, [rollout_server[0]], timeout_s=60, enable_lora=True, max_loras=2
    )
    try:
        engine.update_weights(
            AutoModelForCausalLM.from_pretrained(tiny_tied, dtype=torch.float32)
            .state_dict()
            .items()
        )
        adapter = Adapter("member-0", str(tmp_path / "adapter"))
        ids = [[1, 57, 210, 33], [1, 99, 140]]
        out = engine.generate_ids(ids, Sampling(n=1, max_new_tokens=6), [adapter, adapter])
        for c in out:
            ref = hf_logprobs(merged, c.prompt_token_ids + c.token_ids)[-len(c.token_ids) :]
            assert torch.allclose(torch.tensor(c.logprobs), ref, atol=1e-4)
        plain = engine.generate_ids(ids[:1], Sampling(n=1, max_new_tokens=6))[0]
        base_ref = hf_logprobs(
            AutoModelForCausalLM.from_pretrained(tiny_tied, dtype=torch.float32),
            plain.prompt_token_ids + plain.token_ids,
        )[-len(plain.token_ids) :]
        assert torch.allclose(torch.tensor(plain.logprobs), base_ref, atol=1e-4)
        engine.remove_adapters()
        assert not engine._adapters
    finally:
        engine.close()


def test_adapter_sync_to_a_server_serves_each_new_version(rollout_server, tiny_tied, tmp_path):
    """adapter.sync=adapter with rollout servers: the base weights go first (the server may hold
    another run's), then each sync saves a new adapter version that the server loads through its
    LoRA endpoint; sampled and prompt logprobs are the trainer's PEFT model's (fp32, 1e-4), and
    the previous version is unloaded and deleted."""
    from peft import LoraConfig, get_peft_model

    from rlx.weight_sync import AdapterSync

    base = AutoModelForCausalLM.from_pretrained(tiny_tied, dtype=torch.float32)
    policy = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"]))
    engine = ServerEngine(
        tiny_tied, [rollout_server[0]], timeout_s=60, enable_lora=True, max_loras=2
    )
    other = perturbed_state_dict(tiny_tied, seed=7).state_dict()
    engine.update_weights(other.items())  # another run's weights
    weights = AdapterSync(engine, tmp_path / "sync", push_base=True)
    served = weights.engine
    try:
        for version in (1, 2):
            gen = torch.Generator().manual_seed(version)
            with torch.no_grad():
                for name, p in policy.named_parameters():
                    if "lora_B" in name:
                        p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
            weights.push(policy)
            ref = hf_logprobs(policy, FIXED_TOKENS)
            got = torch.tensor(served.prompt_logprobs([FIXED_TOKENS])[0])
            assert (got - ref).abs().max() <= 1e-4
            c = served.generate(["Sam has"], Sampling(n=1, max_new_tokens=6))[0]
            sampled = hf_logprobs(policy, c.prompt_token_ids + c.token_ids)[-len(c.token_ids) :]
            assert torch.allclose(torch.tensor(c.logprobs), sampled, atol=1e-4)
        assert engine._adapters == {"rlx-rank0-v2"}
        assert [p.name for p in (tmp_path / "sync").iterdir()] == ["rlx-rank0-v2"]
        # what the trainer sees of a restarted server (tests/rollout/test_fleet.py's stubs act
        # it out): a request for an adapter the server lacks is refused with 404, and its
        # /weight_info (read only then; this server's is of this run, so no restart) tells its
        # version; unloading an adapter it lacks (404) is no error
        info = engine.servers[0].call("reading its version", "GET", "/weight_info")
        assert info["weight_version"] == engine.version_name(engine.weight_version)
        engine._adapters.add("rlx-lost")
        with pytest.raises(RolloutWorkerError, match="HTTP 404.*rlx-lost"):
            engine.generate_ids(
                [[1, 57, 210]], Sampling(n=1, max_new_tokens=2), [Adapter("rlx-lost", "")]
            )
        engine.remove_adapters()
        assert not engine._adapters
    finally:
        served.close()


def test_a_failed_sync_on_a_real_server_is_rolled_back(rollout_server, tiny_tied):
    """A chunk the server cannot load (a weight of the wrong shape) fails its /update_weights:
    the update is rolled back and retried once, then one error names the server and the phase;
    the server is resumed, serves again, and the next sync is exact."""
    address, _ = rollout_server
    engine = ServerEngine(tiny_tied, [address], timeout_s=60)
    try:
        engine.update_weights([("model.norm.weight", torch.ones(3))])  # not the norm's shape
        raise AssertionError("the bad chunk should fail")
    except RolloutWorkerError as err:
        assert "again on its retry" in str(err) and address in str(err)
        assert "receiving weights" in str(err)
    try:
        assert engine.servers[0].call("asking", "GET", "/is_paused")["is_paused"] is False
        model = AutoModelForCausalLM.from_pretrained(tiny_tied, dtype=torch.float32)
        engine.update_weights(model.state_dict().items())
        got = torch.tensor(engine.prompt_logprobs([FIXED_TOKENS])[0])
        assert (got - hf_logprobs(model, FIXED_TOKENS)).abs().max() <= 1e-4
        c = engine.generate(["Sam has"], Sampling(n=1, max_new_tokens=4))[0]
        assert c.weight_version == engine.weight_version == 1
    finally:
        engine.close()
