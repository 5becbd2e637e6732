"""The rollout fleet's failure paths and load on stub servers: in-process aiohttp apps that speak
the routes `ServerEngine` uses, with a fake weight-sync transport (the real one is
tests/rollout/test_server.py's and test_weight_transfer.py's). Fast: no vLLM, no subprocess, except
the last test (slow), whose stubs' workers take part in the real gloo group.

Each stub counts its generation requests in flight, holds a weight version, a paused flag, a
"joined" flag and its LoRA adapters (a request naming another model gets 404, as from vLLM), and
can be told to fail a route. Its /init_weight_transfer_engine and
/update_weights wait until every stub of the fleet was called, as a collective would."""

from __future__ import annotations

import asyncio
import json
import math
import subprocess
import sys
import threading
import time
from concurrent.futures import wait
from pathlib import Path

import pytest
import torch
from aiohttp import web

from rlx.rollout import Sampling, server
from rlx.rollout.server import RolloutWorkerError, ServerEngine, ServerRestarted, SyncFailed
from rlx.rollout.sync import generate_synced, push_weights
from rlx.rollout.weight_transfer import within_deadline


class Stub:
    """One stub rollout server (its state; the routes are Fleet's)."""

    def __init__(self):
        self.address = ""  # host:port, once it listens
        self.version = "default"
        self.paused = self.joined = self.updating = False
        self.in_flight = self.peak = self.served = 0
        self.fail: dict[str, int] = {}  # route -> failures left (HTTP 500 at once)
        self.calls: list[str] = []
        self.delay = 0.02  # seconds per generation request
        self.adapters: set[str] = set()
        self.requests = 0  # generation requests received
        self.restart_at = 0  # > 0: restart on receiving that generation request

    def restart(self) -> None:
        """As a supervisor restarts it: base weights, no transfer group, no adapters."""
        self.version, self.paused, self.joined, self.updating = "default", False, False, False
        self.adapters = set()


class Fleet:
    """`size` stubs on one event loop in a thread; `busy`: the most stubs serving at once."""

    def __init__(self, size: int):
        self.stubs = [Stub() for _ in range(size)]
        self.busy = 0
        self.collective: dict[str, int] = {}
        self.loop = asyncio.new_event_loop()
        self.runners = []
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self.loop).result(30)

    @property
    def addresses(self) -> list[str]:
        return [s.address for s in self.stubs]

    async def _start(self) -> None:
        for stub in self.stubs:
            app = web.Application()
            app.router.add_route("*", "/{path:.*}", self._handler(stub))
            runner = web.AppRunner(app, handler_cancellation=True, shutdown_timeout=0.5)
            await runner.setup()
            site = web.TCPSite(runner, "127.0.0.1", 0)  # a free port, no race for it
            await site.start()
            stub.address = f"127.0.0.1:{site._server.sockets[0].getsockname()[1]}"
            self.runners.append(runner)

    async def _collective(self, key: tuple) -> None:
        """Wait (at most 30 s) until every stub entered the collective `key`."""
        self.collective[key] = self.collective.get(key, 0) + 1
        deadline = time.monotonic() + 30
        while self.collective[key] < len(self.stubs) and time.monotonic() < deadline:
            await asyncio.sleep(0.01)

    def _handler(self, stub: Stub):
        async def handle(request: web.Request) -> web.Response:
            path = "/" + request.match_info["path"]
            stub.calls.append(path)
            if stub.fail.get(path, 0) > 0:
                stub.fail[path] -= 1
                stub.updating &= path != "/update_weights"  # vLLM ends a failed update
                return web.Response(status=500, text=f"stub failure on {path}")
            body = await request.json() if request.can_read_body else {}
            if path == "/inference/v1/generate":
                stub.requests += 1
                if stub.requests == stub.restart_at:
                    stub.restart()
            if body.get("model") and body["model"] not in stub.adapters:
                return web.Response(status=404, text=f"The model `{body['model']}` does not exist.")
            return web.json_response(await self._route(stub, path, body))

        return handle

    async def _route(self, stub: Stub, path: str, body: dict) -> dict:
        if path == "/v1/models":
            return {"data": [{"max_model_len": 1024}]}
        if path == "/get_world_size":
            return {"world_size": 1}
        if path == "/inference/v1/generate":
            return await self._generate(stub, body)
        if path == "/init_weight_transfer_engine":
            stub.group, stub.rounds = body["init_info"]["group"], 0
            await self._collective(("join", stub.group))
            stub.joined = True
        elif path == "/update_weights":
            if not stub.joined or not stub.updating:
                raise web.HTTPInternalServerError(text="init_weight_transfer_engine not called")
            stub.rounds += 1
            await self._collective(("update", stub.group, stub.rounds))
        elif path == "/pause":
            stub.paused = True
        elif path == "/resume":
            stub.paused = False
        elif path == "/start_weight_update":
            stub.updating = True
        elif path == "/finish_weight_update":
            if not stub.updating:  # as vLLM's worker
                raise web.HTTPInternalServerError(text="finish without a matching start")
            stub.updating = False
            stub.version = body.get("weight_version") or stub.version
        elif path == "/update_weight_version":
            stub.version = body["new_version"]
        elif path == "/weight_info":
            return {"weight_version": stub.version}
        elif path == "/rlx/load_lora_adapter":
            stub.adapters.add(body["lora_name"])
        elif path == "/v1/unload_lora_adapter":
            if body["lora_name"] not in stub.adapters:
                raise web.HTTPNotFound(
                    text=f"The lora adapter '{body['lora_name']}' cannot be found."
                )
            stub.adapters.remove(body["lora_name"])
        elif path == "/shutdown_weight_transfer_engine":
            stub.joined = False
        return {"ok": True}

    async def _generate(self, stub: Stub, body: dict) -> dict:
        stub.in_flight += 1
        stub.peak = max(stub.peak, stub.in_flight)
        self.busy = max(self.busy, sum(s.in_flight > 0 for s in self.stubs))
        try:
            await asyncio.sleep(stub.delay)
        finally:
            stub.in_flight -= 1
        stub.served += 1
        n, t = body["sampling_params"]["n"], body["sampling_params"]["max_tokens"]
        choice = {
            "token_ids": [5] * t,
            "text": "x" * t,
            "finish_reason": "length",
            "logprobs": {"content": [{"logprob": -1.0}] * t},
            "weight_versions": [{"version": stub.version, "start": 0, "end": t}],
        }
        # samples of different lengths: rewards that vary within a group
        return {"choices": [{"index": i, **choice, "text": "x" * (i + 1)} for i in range(n)]}

    def close(self) -> None:
        async def stop():
            for runner in self.runners:
                await runner.cleanup()

        asyncio.run_coroutine_threadsafe(stop(), self.loop).result(30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


class FakeSender:
    """The trainer's side of a weight-sync group that carries nothing: opening and sending wait
    for the servers' calls, under the real deadline and peer checks (within_deadline)."""

    backend, port, groups = "gloo", 0, 0

    def __init__(self, host: str, port: int):
        self.timeout_s = 600.0
        FakeSender.groups += 1
        self.group = FakeSender.groups  # the servers' collectives count per group

    def init_info(self, rank_offset: int, world_size: int, timeout_s: float) -> dict:
        return {"rank_offset": rank_offset, "world_size": world_size, "group": self.group}

    def open(self, world_size, timeout_s, peers=()):
        self.timeout_s = timeout_s
        within_deadline(lambda: wait(peers), timeout_s, "opening the fake group", peers)

    def send(self, tensors, dtype_names, peers=()):
        within_deadline(lambda: wait(peers), self.timeout_s, "sending weights (fake)", peers)

    def close(self) -> None:
        pass


@pytest.fixture
def fake_sync(monkeypatch):
    monkeypatch.setattr(
        server, "make_sender", lambda backend, host, port, *a: FakeSender(host, port)
    )


@pytest.fixture
def fleet3():
    fleet = Fleet(3)
    yield fleet
    fleet.close()


def make_engine(tiny_tied, fleet: Fleet, timeout_s: float = 20, **kw) -> ServerEngine:
    return ServerEngine(tiny_tied, fleet.addresses, timeout_s=timeout_s, sync_backend="gloo", **kw)


WEIGHTS = [("w", torch.ones(4))]
SAMPLING = Sampling(n=1, max_new_tokens=2)


# ----------------------------------------------------------------- dispatch by load


def test_four_servers_are_all_busy_with_512_prompts(tiny_tied):
    """Least-loaded dispatch with a bound per server: every server serves at once, none holds
    more than its bound, and the work is shared (contiguous slices through one pool of 64
    threads kept one server busy at a time)."""
    fleet = Fleet(4)
    for stub in fleet.stubs:
        stub.delay = 0.2  # requests pile up faster than the stubs serve them
    engine = make_engine(tiny_tied, fleet)
    engine.max_in_flight = 16
    try:
        out = engine.generate_ids([[1, i] for i in range(512)], SAMPLING)
        assert [c.prompt_index for c in out] == list(range(512))
        assert fleet.busy == 4
        assert all(8 <= s.peak <= 16 for s in fleet.stubs), [s.peak for s in fleet.stubs]
        assert all(s.served >= 64 for s in fleet.stubs), [s.served for s in fleet.stubs]
    finally:
        engine.close()
        fleet.close()


def test_rollout_max_in_flight_bounds_each_server(tiny_tied):
    """The knob reaches dispatch through from_config: no server ever holds more than it."""
    from rlx.config import ConfigError, RolloutConfig

    with pytest.raises(ConfigError, match="max_in_flight must be >= 1"):
        RolloutConfig(max_in_flight=0)
    fleet = Fleet(2)
    for stub in fleet.stubs:
        stub.delay = 0.05
    cfg = RolloutConfig(backend="server", servers=fleet.addresses, max_in_flight=3)
    engine = ServerEngine.from_config(tiny_tied, cfg)
    try:
        assert len(engine.generate_ids([[1, i] for i in range(24)], SAMPLING)) == 24
        assert [s.peak for s in fleet.stubs] == [3, 3]
        assert [s.peak_in_flight for s in engine.servers] == [3, 3]
    finally:
        engine.close()
        fleet.close()


def test_eighty_servers_connect_and_sync_without_deadlock(tiny_tied, fake_sync):
    """80 servers join the weight-sync group and take an update: every join and update call is
    in flight at once (the stubs wait for all 80, as a collective does). One pool of 64 threads
    could not send the 65th join while 64 threads waited in theirs."""
    fleet = Fleet(80)
    engine = make_engine(tiny_tied, fleet, timeout_s=15)
    try:
        start = time.monotonic()
        engine.update_weights(WEIGHTS)
        assert time.monotonic() - start < 10
        name = engine.version_name(1)
        assert all(s.version == name and not s.paused and s.joined for s in fleet.stubs)
        assert {c.weight_version for c in engine.generate_ids([[1, 2]] * 80, SAMPLING)} == {1}
    finally:
        engine.close()
        fleet.close()


# ----------------------------------------------------------------- sync as a transaction


def test_a_failed_update_is_rolled_back_then_retried(tiny_tied, fake_sync, fleet3):
    """A server's /update_weights fails before the broadcast: the send ends at once (its future
    is watched), every server is finished and resumed, and the update runs again and lands on
    all servers."""
    engine = make_engine(tiny_tied, fleet3)
    try:
        fleet3.stubs[1].fail["/update_weights"] = 1
        start = time.monotonic()
        engine.update_weights(WEIGHTS)
        assert time.monotonic() - start < 10  # not the 20 s timeout
        assert fleet3.stubs[1].calls.count("/resume") == 2  # the rollback's, then the retry's
        assert all(s.version == engine.version_name(1) for s in fleet3.stubs)
        assert not any(s.paused or s.updating for s in fleet3.stubs)
        assert engine.weight_version == 1
    finally:
        engine.close()


def test_a_sync_that_fails_twice_resumes_every_server_and_names_it(tiny_tied, fake_sync, fleet3):
    engine = make_engine(tiny_tied, fleet3)
    try:
        engine.update_weights(WEIGHTS)
        bad = fleet3.stubs[2]
        bad.fail["/update_weights"] = 2
        start = time.monotonic()
        line = f"again on its retry.*{bad.address}.*receiving weights"
        with pytest.raises(RolloutWorkerError, match=line):
            push_weights(engine, lambda: [WEIGHTS, WEIGHTS], 5)
        assert time.monotonic() - start < 10
        assert not any(s.paused or s.updating for s in fleet3.stubs)
        assert engine.weight_version == 1
        # the chunks that did arrive left the weights mixed: the servers say so
        assert all(s.version.endswith(":5-incomplete") for s in fleet3.stubs)
    finally:
        engine.close()


def test_a_failure_of_the_chunk_source_resumes_every_server(tiny_tied, fake_sync, fleet3):
    """The trainer's own error while producing chunks: servers finished on the old version and
    resumed, the error is the caller's, unchanged; a pause failure is rolled back too."""
    engine = make_engine(tiny_tied, fleet3)
    try:
        with pytest.raises(KeyError), engine.weight_update():
            engine.update_weights(WEIGHTS)
            raise KeyError("the gather failed")
        assert not any(s.paused or s.updating for s in fleet3.stubs)
        assert engine.weight_version == 0
        fleet3.stubs[0].fail["/pause"] = 1
        calls = []

        def chunks():
            calls.append(1)
            return [WEIGHTS, WEIGHTS]

        push_weights(engine, chunks)  # drained unsent on the failed try, then sent again
        assert len(calls) == 2 and engine.weight_version == 1
        assert all(s.version == engine.version_name(1) for s in fleet3.stubs)
        assert not any(s.paused for s in fleet3.stubs)
    finally:
        engine.close()


def test_a_sync_failure_raises_sync_failed_from_weight_update(tiny_tied, fake_sync, fleet3):
    engine = make_engine(tiny_tied, fleet3)
    try:
        fleet3.stubs[0].fail["/finish_weight_update"] = 1
        failing = pytest.raises(SyncFailed, match="finishing a weight update")
        with failing, engine.weight_update(3):
            engine.update_weights(WEIGHTS)
        assert not any(s.paused for s in fleet3.stubs) and engine.weight_version == 0
    finally:
        engine.close()


# ----------------------------------------------------------------- versions


def test_stale_and_foreign_completions_are_refused(tiny_tied, fake_sync, fleet3):
    engine = make_engine(tiny_tied, fleet3)
    engine.run_id = "runA"
    try:
        engine.update_weights(WEIGHTS)
        assert {c.weight_version for c in engine.generate_ids([[1]] * 6, SAMPLING)} == {1}
        late = fleet3.stubs[1]
        late.version = "runA:0"  # it missed the sync
        with pytest.raises(RolloutWorkerError, match=f"{late.address}.*step 0, 1 versions behind"):
            engine.generate_ids([[1]] * 6, SAMPLING)
        engine.max_staleness = 1  # an asynchronous loop's allowance
        assert {c.weight_version for c in engine.generate_ids([[1]] * 6, SAMPLING)} == {0, 1}
        late.version = "runB:7"
        with pytest.raises(RolloutWorkerError, match=f"{late.address} serves weights of another"):
            engine.generate_ids([[1]] * 6, SAMPLING)
    finally:
        engine.close()


def test_a_restarted_server_is_resynced(tiny_tied, fake_sync, fleet3):
    """A server restarted after a sync serves base weights ("default") and has no transfer
    group: generate refuses to train on it, the weight-sync group is re-made with every server
    and the current weights pushed again."""
    engine = make_engine(tiny_tied, fleet3)
    engine.run_id = "runA"
    try:
        engine.update_weights(WEIGHTS)
        fleet3.stubs[0].restart()
        with pytest.raises(ServerRestarted, match=f"{fleet3.stubs[0].address}.*'default'"):
            engine.generate_ids([[1]] * 6, SAMPLING)

        def resync():
            push_weights(engine, lambda: [WEIGHTS], engine.weight_version)

        fleet3.stubs[0].restart()
        out = generate_synced(engine, lambda: engine.generate_ids([[1]] * 6, SAMPLING), resync)
        assert {c.weight_version for c in out} == {1}
        assert all(s.joined and s.version == "runA:1" for s in fleet3.stubs)
        assert fleet3.stubs[1].calls.count("/init_weight_transfer_engine") == 2
    finally:
        engine.close()


def test_a_restarted_server_gets_the_base_again_under_adapter_sync(
    tiny_tied, fake_sync, fleet3, tmp_path
):
    """adapter.sync=adapter pushes the base model once, then adapters only. A restarted server
    has lost the adapter (it refuses the request, 404) and the run's version: the engine finds
    it by its version, and the full re-push gives it the base under the run's version through a
    new group, then the adapter; the old adapter is unloaded where it still is."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from rlx.weight_sync import AdapterSync

    base = AutoModelForCausalLM.from_pretrained(tiny_tied, dtype=torch.float32)
    policy = get_peft_model(base, LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"]))
    engine = make_engine(tiny_tied, fleet3, enable_lora=True)
    engine.run_id = "runA"
    weights = AdapterSync(engine, tmp_path / "sync", push_base=True)
    served = weights.engine

    def draw():
        return served.generate_ids([[1, 2]] * 6, SAMPLING)

    try:
        weights.push(policy, 3)  # the base as version 3, then adapter v1
        weights.push(policy, 4)  # adapter v2 alone: the servers keep the base's version
        assert {c.weight_version for c in draw()} == {3}
        restarted = fleet3.stubs[1]
        restarted.restart()
        with pytest.raises(ServerRestarted, match=f"{restarted.address}.*'default'"):
            draw()
        out = generate_synced(served, draw, lambda: weights.push(policy, 4, full=True))
        assert {c.weight_version for c in out} == {4}
        assert restarted.calls.count("/update_weights") == 2  # the base, twice
        assert restarted.calls.count("/init_weight_transfer_engine") == 2  # a new group
        assert all(s.version == "runA:4" and s.joined for s in fleet3.stubs)
        assert all(s.adapters == {"rlx-rank0-v3"} for s in fleet3.stubs)
        assert not any(s.paused for s in fleet3.stubs)
    finally:
        served.close()


@pytest.mark.slow  # two short pg runs of the tiny model (stub servers): ~45 s each on 2 AVX2 cores
@pytest.mark.parametrize("async_", [False, True])
def test_pg_with_adapter_sync_recovers_from_a_restarted_server(
    async_, tiny_tied, fake_sync, tmp_path, capsys
):
    """recipes/pg.py with adapter.sync=adapter on two stub servers, one of which restarts in the
    middle of the run: the synchronous loop and the asynchronous source both re-push the base
    and the adapter (the restarted stub takes the base a second time) and the run ends."""
    import importlib.util

    from rlx.config import PGConfig, load_config
    from rlx.metrics import read_metrics

    spec = importlib.util.spec_from_file_location(
        "pg_recipe_restart", Path(__file__).resolve().parents[2] / "recipes" / "pg.py"
    )
    recipe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(recipe)
    reward = tmp_path / "length.py"
    reward.write_text(
        "def longer(prompts, completions, **kw):\n    return [len(c) for c in completions]\n"
    )
    fleet = Fleet(2)
    fleet.stubs[1].restart_at = 2  # its second generation request: the run's second step
    args = {
        "model.name": tiny_tied,
        "rollout.backend": "server",
        "rollout.servers": f"[{','.join(fleet.addresses)}]",
        "rollout.sync_backend": "gloo",
        "rollout.timeout_s": 20,
        "rollout.enable_lora": "true",
        "adapter.method": "lora",
        "adapter.rank": 4,
        "adapter.sync": "adapter",
        "rollout.async": str(async_).lower(),
        "rollout.num_samples": 2,
        "rollout.max_new_tokens": 4,
        "prompts_per_step": 2,
        "steps": 3,
        "micro_batch_size": 4,
        "eval.enabled": "false",
        "output_dir": str(tmp_path / "out"),
        "log_with": "[]",
        "rewards": f"[{{func: '{reward}:longer', weight: 1.0}}]",
    }
    try:
        recipe.train(load_config(PGConfig, overrides=[f"{k}={v}" for k, v in args.items()]))
        rows = read_metrics(tmp_path / "out" / "metrics.jsonl")
        assert [r["step"] for r in rows] == [1, 2, 3]
        line = f"rollout: rollout server http://{fleet.stubs[1].address} serves weights 'default'"
        assert line in capsys.readouterr().out
        restarted = fleet.stubs[1]
        assert restarted.calls.count("/update_weights") == 2  # the base at the start, and again
        assert fleet.stubs[0].version == restarted.version != "default"
        calls = restarted.calls
        base_again = len(calls) - calls[::-1].index("/update_weights")
        assert "/rlx/load_lora_adapter" in calls[base_again:]  # then an adapter
        assert "/inference/v1/generate" in calls[base_again:]
        assert not restarted.paused
    finally:
        fleet.close()


def test_the_run_id_survives_a_resume(tmp_path):
    from rlx.recipe import read_run_id

    class OneProcess:
        is_main_process = True

        def wait_for_everyone(self):
            pass

    first = read_run_id(tmp_path, False, OneProcess())
    assert read_run_id(tmp_path, True, OneProcess()) == first
    assert (tmp_path / "run_id").read_text().strip() == first
    assert read_run_id(tmp_path, False, OneProcess()) != first  # a new run: a new id


def test_max_staleness_applies_only_to_the_asynchronous_loop(tiny_tied, fleet3):
    from rlx.config import RolloutConfig

    sync = RolloutConfig(backend="server", servers=fleet3.addresses, max_staleness=3)
    engine = ServerEngine.from_config(tiny_tied, sync, run_id="r")
    assert engine.max_staleness == 0 and engine.run_id == "r"
    engine.close()
    sync.async_ = True
    engine = ServerEngine.from_config(tiny_tied, sync)
    assert engine.max_staleness == 3
    engine.close()


# ----------------------------------------------------------------- errors keep their lines


def test_a_hung_stub_gives_one_error_within_the_timeout(tiny_tied, fleet3):
    engine = make_engine(tiny_tied, fleet3, timeout_s=1)
    fleet3.stubs[2].delay = 30
    try:
        start = time.monotonic()
        with pytest.raises(RolloutWorkerError, match=f"{fleet3.stubs[2].address}.*within.*gen"):
            engine.generate_ids([[1]] * 9, SAMPLING)
        assert time.monotonic() - start < 5
    finally:
        engine.close()


# ----------------------------------------------------------------- importance correction


@pytest.mark.parametrize("backend", ["server", "vllm", "hf"])
def test_importance_correction_uses_every_backends_sampler_logprobs(
    tiny_llama, backend, monkeypatch
):
    """recipes/pg.py hands the sampler's logprobs to the loss (algo.tis_*) for rollout servers
    too: they return vLLM's processed logprobs, as the in-process engines do."""
    import importlib.util
    from pathlib import Path

    from accelerate import Accelerator

    from rlx.algos import pg
    from rlx.config import AdapterConfig, PGConfig, load_config
    from rlx.policy import load_policy
    from rlx.rollout import Completion

    spec = importlib.util.spec_from_file_location(
        "pg_recipe", Path(__file__).resolve().parents[2] / "recipes" / "pg.py"
    )
    recipe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(recipe)
    args = [f"model.name={tiny_llama}", "rollout.num_samples=2", "prompts_per_step=1"]
    args += [f"rollout.backend={backend}", "rollout.servers=[127.0.0.1:9]"]
    cfg = load_config(PGConfig, None, args)
    model, tokenizer = load_policy(cfg.model, AdapterConfig())
    completions = [
        Completion(0, [1, 5, 7], [9, 11, 13], [-1.5, -2.0, -0.5], "", "length", 0) for _ in range(2)
    ]
    (mini,) = recipe.local_mini_batches(
        cfg, completions, torch.zeros(1, dtype=torch.long), torch.tensor([[1.0, -1.0]]), 0, 1
    )
    seen = []

    def spy(logp, old, sampler, *rest):
        seen.append(sampler)
        raise StopIteration

    monkeypatch.setattr(pg, "policy_loss", spy)
    with pytest.raises(StopIteration):
        recipe.train_on_batch(cfg, Accelerator(cpu=True), model, None, mini, 1)
    assert seen[0] is not None
    assert torch.equal(seen[0][0], torch.tensor([-1.5, -2.0, -0.5]))


def test_other_ranks_expect_rank_0s_versions(tiny_tied, fleet3):
    """Trainer ranks other than 0 send nothing, and check completions against the version rank
    0 pushed (chunked or whole)."""
    engine = make_engine(tiny_tied, fleet3, sender=False)
    try:
        with engine.weight_update(4):
            engine.update_weights(WEIGHTS)
            engine.update_weights(WEIGHTS)
        assert engine.weight_version == 4 and engine.synced
        engine.update_weights(WEIGHTS)
        assert engine.weight_version == 5
        assert fleet3.stubs[0].calls == ["/health", "/v1/models"]  # no sync call
    finally:
        engine.close()


# ----------------------------------------------------------------- a sync abandoned mid-broadcast

TOKEN = "fleet-token"
SEND_THREAD = "rlx weight sync: sending weights over gloo"  # within_deadline's thread name

# A server's worker in a process of its own, on the real gloo transport: it joins the group and
# proves the token, then never takes the update (it is killed inside it).
DYING_WORKER = f"""
import json, sys
import vllm.distributed.utils  # the import takes seconds: before "ready", not inside the sync
from rlx.rollout.weight_transfer import check_members, open_group, refuse_members
print("ready", flush=True)
info = json.loads(sys.stdin.readline())
rank, world = info["rank_offset"], info["world_size"]
group = open_group(info["master_address"], info["master_port"], rank, world, info["timeout_s"])
refuse_members(check_members(group, rank, world, {TOKEN!r}), "server")
print("joined", flush=True)
sys.stdin.readline()
"""


class GlooFleet(Fleet):
    """Two stubs whose workers take part in the real gloo weight-sync group: stub 0's worker is a
    thread here (it survives), stub 1's a process that is killed with SIGKILL once the trainer
    is inside the broadcast of an update."""

    def __init__(self):
        self.proc = subprocess.Popen(
            [sys.executable, "-c", DYING_WORKER],
            cwd=Path(__file__).resolve().parents[2],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdout.readline().strip() == "ready"
        self.group = None  # the surviving worker's
        self.received = None  # what the surviving worker's broadcast ended with
        self.killed_mid_send = None
        super().__init__(2)

    async def _route(self, stub: Stub, path: str, body: dict) -> dict:
        dying = stub is self.stubs[1]
        loop = asyncio.get_running_loop()
        if path == "/init_weight_transfer_engine":
            join = self._join_process if dying else self._join_thread
            await loop.run_in_executor(None, join, body["init_info"])
            stub.joined = True
            return {"ok": True}
        if path == "/update_weights":
            if dying:
                await self._die_inside_the_broadcast()
                raise web.HTTPInternalServerError(text="the worker died (SIGKILL)")
            self.received = await loop.run_in_executor(None, self._receive, body["update_info"])
            return {"ok": True}
        return await super()._route(stub, path, body)

    def _join_process(self, info: dict) -> None:
        self.proc.stdin.write(json.dumps(info) + "\n")
        self.proc.stdin.flush()
        assert self.proc.stdout.readline().strip() == "joined"

    def _join_thread(self, info: dict) -> None:
        from rlx.rollout.weight_transfer import check_members, open_group, refuse_members

        rank, world = info["rank_offset"], info["world_size"]
        host, port = info["master_address"], info["master_port"]
        self.group = open_group(host, port, rank, world, info["timeout_s"])
        refuse_members(check_members(self.group, rank, world, TOKEN), "server")

    def _receive(self, update: dict):
        """The chunk's broadcasts, as rlx_gloo's worker receives them; the error if one fails
        (the trainer abandoned the group: gloo's own timeout ends the wait)."""
        from rlx.rollout.weight_transfer import broadcast, dtype_of, flat_groups

        try:
            for dtype, indices in flat_groups(update["dtype_names"]):
                size = sum(math.prod(update["shapes"][i]) for i in indices)
                broadcast(self.group, torch.empty(size, dtype=dtype_of(dtype)))
        except RuntimeError as err:
            return err
        return "all"

    async def _die_inside_the_broadcast(self) -> None:
        """SIGKILL the worker once the trainer's broadcast thread has run for a moment."""
        deadline = time.monotonic() + 10
        while not _sending() and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.3)
        self.killed_mid_send = _sending()
        self.proc.kill()
        self.proc.wait()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        super().close()


def _sending() -> bool:
    return any(t.name == SEND_THREAD and t.is_alive() for t in threading.enumerate())


@pytest.mark.slow  # a worker process that imports vLLM: about half a minute on a 2-core AVX2 CPU
def test_a_receiver_that_dies_inside_the_broadcast_ends_the_sync(tiny_tied):
    """Real gloo peers: a server's worker is killed (SIGKILL) while the trainer broadcasts a
    chunk too large to pass without it. The trainer's update ends with SyncFailed naming the
    server long before rollout.timeout_s, every server is finished and resumed on its old
    version, and the surviving worker's receive ends too (gloo's timeout at the latest)."""
    fleet = GlooFleet()
    timeout_s = 20
    engine = make_engine(tiny_tied, fleet, timeout_s=timeout_s, token=TOKEN)
    engine.run_id = "runA"
    chunk = [("w", torch.ones(16 * 2**20))]  # 64 MiB: the send waits for every receiver
    try:
        start = time.monotonic()
        failing = pytest.raises(SyncFailed, match=f"{fleet.stubs[1].address}.*died")
        with failing, engine.weight_update(1):
            engine.update_weights(chunk)
        assert time.monotonic() - start < timeout_s / 2
        assert fleet.killed_mid_send
        assert not any(s.paused or s.updating for s in fleet.stubs)
        assert all(s.version == "runA:1-incomplete" for s in fleet.stubs)  # a chunk had left
        assert engine.weight_version == 0 and engine._sender is None
        deadline = time.monotonic() + timeout_s + 10
        while fleet.received is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert fleet.received is not None, "the surviving worker is still inside the broadcast"
    finally:
        engine.close()
        fleet.close()
