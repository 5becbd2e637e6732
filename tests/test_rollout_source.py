"""Rollout sources (rlx/rollout_source.py) on a fake engine: the asynchronous source's prompts,
staleness bound, drop of stale batches, resume point and failure path. No model, a second each."""

from __future__ import annotations

import threading
import time
from types import SimpleNamespace

import pytest
from datasets import Dataset

from rlx.config import ConfigError
from rlx.rollout.base import Completion
from rlx.rollout.server import ServerRestarted
from rlx.rollout_source import AsyncRollouts, SyncRollouts


def make_cfg(k: int = 1, steps: int = 8, tis_cap: float = 2.0):
    rollout = SimpleNamespace(
        num_samples=2,
        max_new_tokens=4,
        temperature=1.0,
        top_p=1.0,
        top_k=-1,
        stop=[],
        max_staleness=k,
    )
    algo = SimpleNamespace(tis_cap=tis_cap)
    return SimpleNamespace(rollout=rollout, algo=algo, prompts_per_step=4, seed=3, steps=steps)


class FakeEngine:
    """Completions that record which weights (`loaded`, bumped by the test's syncs) and which
    prompts they came from; `delay` seconds per generate call."""

    def __init__(self, delay: float = 0.0, fail: bool = False):
        self.delay, self.fail, self.loaded, self.calls = delay, fail, 0, []

    def generate(self, prompts, sampling):
        if self.fail:
            raise ValueError("engine down")
        self.calls.append(list(prompts))
        time.sleep(self.delay)
        return [
            Completion(i, [1], [2, 3], [-0.5, -0.5], f"{p}@{self.loaded}", "stop")
            for i, p in enumerate(prompts)
            for _ in range(sampling.n)
        ]


DATA = Dataset.from_dict({"prompt": [f"p{i}" for i in range(10)]})


def learn(source, engine, steps, start=0, train_s=0.0):
    """The loop's use of a source: next, train, sync; returns each step's batch and metrics."""
    out = []
    for step in range(start, steps):
        rows, completions = source.next(step)
        time.sleep(train_s)
        with source.syncing():
            engine.loaded += 1
        out.append((rows["prompt"], completions, source.metrics()))
    source.close()
    return out


def test_async_source_samples_the_sync_prompts_within_max_staleness():
    cfg, engine = make_cfg(k=1, steps=6), FakeEngine(delay=0.01)
    got = learn(AsyncRollouts(cfg, engine, DATA, 1, 2), engine, cfg.steps, train_s=0.01)
    sync = SyncRollouts(cfg, FakeEngine(), DATA, 1, 2)
    for step, (prompts, completions, metrics) in enumerate(got):
        assert prompts == sync.next(step)[0]["prompt"]  # rank 1 of 2: the same share
        assert len(completions) == 2 * 2
        versions = {c.weight_version for c in completions}
        (version,) = versions
        assert step - version <= 1  # one sync per step: version = steps trained
        assert {c.text.split("@")[1] for c in completions} == {str(version)}
        assert metrics["async/dropped"] == 0
        assert metrics[f"async/staleness_{step - version}"] == 4
        assert 0 <= metrics["async/trainer_idle"] <= 1
        assert 0 <= metrics["async/generator_idle"] <= 1
    assert [v for _, c, _ in got for v in {c[0].weight_version}][1:] == list(range(5))


def test_producer_runs_at_most_max_staleness_steps_ahead():
    cfg, engine = make_cfg(k=2), FakeEngine()
    source = AsyncRollouts(cfg, engine, DATA, 0, 1)
    source.next(0)
    time.sleep(0.3)
    assert len(engine.calls) == 3  # steps 0, 1, 2; step 3 waits for the learner to ask for 1
    source.next(1)
    assert source.metrics()["async/queue"] == 1  # step 2 waits when the learner takes step 1
    time.sleep(0.3)
    assert len(engine.calls) == 4
    source.close()


def test_a_batch_older_than_max_staleness_is_dropped_and_sampled_again():
    cfg, engine = make_cfg(k=1), FakeEngine()
    source = AsyncRollouts(cfg, engine, DATA, 0, 1)
    source.next(0)
    deadline = time.time() + 5
    while len(engine.calls) < 2 and time.time() < deadline:  # step 1, on version 0
        time.sleep(0.01)
    for _ in range(2):  # two syncs before the learner takes step 1: staleness 2 > k
        with source.syncing():
            engine.loaded += 1
    _, completions = source.next(1)
    assert {c.weight_version for c in completions} == {2}
    assert {c.text for c in completions} <= {f"p{i}@2" for i in range(10)}
    metrics = source.metrics()
    assert metrics["async/dropped"] == 8  # 4 prompts x 2 samples
    assert metrics["async/staleness_0"] == 8 and metrics["async/staleness_1"] == 0
    source.close()


def test_resumed_source_starts_at_the_checkpoint_step():
    """Nothing in flight is checkpointed: the producer restarts at the resumed step, with that
    step's prompts, on the weights the run resumed with."""
    cfg, engine = make_cfg(k=1, steps=6), FakeEngine()
    got = learn(AsyncRollouts(cfg, engine, DATA, 0, 1), engine, cfg.steps, start=4)
    sync = SyncRollouts(cfg, FakeEngine(), DATA, 0, 1)
    assert [prompts for prompts, _, _ in got] == [sync.next(s)[0]["prompt"] for s in (4, 5)]
    assert engine.calls == [sync.next(s)[0]["prompt"] for s in (4, 5)]  # no step before 4
    assert {c.weight_version for c in got[0][1]} == {0}


def test_generation_and_sync_never_interleave():
    cfg, engine = make_cfg(k=1, steps=5), FakeEngine(delay=0.02)
    busy = threading.Lock()
    generate = engine.generate

    def exclusive_generate(prompts, sampling):
        assert busy.acquire(blocking=False), "generate ran during a sync"
        try:
            return generate(prompts, sampling)
        finally:
            busy.release()

    engine.generate = exclusive_generate
    source = AsyncRollouts(cfg, engine, DATA, 0, 1)
    for step in range(cfg.steps):
        source.next(step)
        with source.syncing():
            assert busy.acquire(blocking=False), "a sync began during generate"
            time.sleep(0.02)
            busy.release()
    source.close()


class RestartingEngine(FakeEngine):
    """A rollout-server-like engine (`transactional`): its generate calls number `restarts` meet
    a restarted server (ServerRestarted) until the loop re-pushes (`resync`)."""

    transactional = True

    def __init__(self, restarts: set[int]):
        super().__init__()
        self.restarts, self.down, self.resyncs, self.generates = restarts, False, [], 0

    def generate(self, prompts, sampling):
        self.generates += 1
        self.down |= self.generates in self.restarts
        if self.down:
            raise ServerRestarted("rollout server http://stub serves weights 'default'")
        return super().generate(prompts, sampling)

    def resync(self):
        self.resyncs.append(threading.current_thread().name)
        self.down = False


@pytest.mark.parametrize("restart_at", [1, 3])
def test_async_source_recovers_from_a_restarted_server(restart_at):
    """The producer meets a restarted server (the first step's generation, or one while the
    learner trains): it does not push; the learner re-pushes at its next step, on its own
    thread, without counting a version, and every step still gets its whole batch. Before, the
    producer's ServerRestarted ended the run."""
    cfg, engine = make_cfg(k=1, steps=5), RestartingEngine({restart_at})
    source = AsyncRollouts(cfg, engine, DATA, 0, 1)
    source.resync = engine.resync
    got = learn(source, engine, cfg.steps)
    assert engine.resyncs == [threading.current_thread().name]
    assert [len(completions) for _, completions, _ in got] == [8] * cfg.steps
    assert source.version == cfg.steps  # the learner's syncs; the re-push is not one
    assert all(m["async/dropped"] == 0 for _, _, m in got)


def test_async_source_stops_when_the_server_restarts_again():
    """A restart met again right after the re-push is the run's error, as in the synchronous
    loop (rlx.rollout.sync.generate_synced)."""
    cfg, engine = make_cfg(k=1, steps=4), RestartingEngine({1, 2})
    source = AsyncRollouts(cfg, engine, DATA, 0, 1)
    source.resync = lambda: engine.resyncs.append("again")  # leaves the server down
    with pytest.raises(ServerRestarted):
        source.next(0)
    assert engine.resyncs == ["again"]
    source.close()


def test_producer_failure_reaches_the_learner():
    source = AsyncRollouts(make_cfg(), FakeEngine(fail=True), DATA, 0, 1)
    with pytest.raises(RuntimeError, match="rollout producer failed: engine down"):
        source.next(0)
    source.close()


def test_async_needs_importance_correction():
    with pytest.raises(ConfigError, match="algo.tis_cap"):
        AsyncRollouts(make_cfg(tis_cap=0.0), FakeEngine(), DATA, 0, 1)
