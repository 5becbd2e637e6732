"""Rollout sources: where the policy-gradient loop takes each step's prompts and completions.

    source.next(step) -> (this rank's prompt rows, their completions, prompt-major)

`SyncRollouts` samples the step's prompts when the learner asks, on the weights of the last sync:
generation and training take turns. `AsyncRollouts` (rollout.async=true) overlaps them: a producer
thread samples the next steps' prompts on the newest synced weights while the learner trains, as
TRL's async GRPO, verl's fully-async trainer, AReaL and PipelineRL do.

Versions and staleness. The source counts the weight syncs the loop tells it about (`syncing()`):
that count is the trainer's weight version, and a batch's behaviour version is the count when its
generation began. A batch used when the count is v + s has staleness s. The producer may start
step j only once the learner has asked for step j - k (k = rollout.max_staleness), so with one
sync per step nothing older than k versions reaches the learner; the learner still checks every
batch, and one older than k is dropped, counted, and sampled again at once on the current weights
(staleness 0), so every rank's batch keeps its shape without a cross-rank decision. Completions of
in-process engines carry the behaviour version in `Completion.weight_version`; rollout servers put
their own count there, and staleness is still measured from the submission (an upper bound: a
server may finish a request on newer weights after a sync).

The loss corrects the lag: the clipped ratio is taken against the trainer's logprobs at the start
of the step (the proximal policy, recomputed by the trainer) and truncated importance sampling
(algo.tis_*) weighs each token by proximal / behaviour, the behaviour logprobs being the sampler's
(decoupled PPO, as AReaL). rollout.async=true therefore needs algo.tis_cap > 0.

Engine use. One lock orders the engine's users in this process: the producer holds it while it
generates, the loop while it syncs weights (`syncing()`), and features that evaluate on the engine
through `engine` (a view that takes the lock per call). In-process engines must not generate while
their weights load; rollout servers would pause themselves, but their client's request pool is
shared with the sync's calls, so the same rule holds for every backend. A sync waits for the
generation under way (which the learner needs next anyway with k = 1).

A fixed schedule. A sync also waits until the producer has begun every step it may begin (up to
the step the learner asked for last, plus k), so step j is always sampled on version
max(0, j - k) once the run is under way, however the threads are scheduled: the versions, and
with in-process engines the whole run, do not depend on timing. Without it a busy machine could
let the learner sync before the producer took the lock, and step j would be sampled one version
fresher. The wait costs nothing when generation keeps up with training (the producer began long
before), and when it does not the sync waits for a generation the learner needs next anyway.

A restarted rollout server. The producer must not push weights: under ZeRO-3 a push is a
collective of every trainer rank, and pushing is the learner's job. So when a generation meets a
restarted server (`ServerRestarted`, rlx/rollout/server.py) its completions are dropped, the
producer hands the learner an empty batch marked with that error for the step, and waits until
the learner has re-pushed before it samples the next step. The learner, at its next `next()`
(every rank calls it at the same point), agrees with the other ranks whether any of them met a
restarted server (rlx.rollout.sync.agree, as the synchronous loop's generate_synced); if so every
rank re-pushes the current weights (`resync`, under the engine lock, without counting a new
version: the weights are the same), and a rank whose batch was lost samples it again itself, at
once, on the learner's thread (staleness 0). A second restart met by that sampling is the run's
error, as in the synchronous loop. The same holds for the sampling again of a batch that was
too stale.

Resume. In-flight and queued completions are not checkpointed: a resumed run starts the producer
at the checkpoint's step, on the checkpoint's weights, with the same prompts (step_prompt_indices)
and sampling seeds as that step would have had. Its first k steps are therefore sampled fresher
(staleness 0) than the uninterrupted run's were; from there on the two agree in kind.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch

from rlx import distributed
from rlx.config import ConfigError
from rlx.data import step_prompt_indices
from rlx.rollout.base import Sampling
from rlx.rollout.server import ServerRestarted
from rlx.rollout.sync import agree, generate_synced


def step_rows(cfg, data, step: int, rank: int, world: int):
    """This rank's prompt rows of step `step`: every world-th of the step's prompts."""
    idx = step_prompt_indices(step, cfg.prompts_per_step, len(data), cfg.seed)
    return data.select(idx[rank::world])


def sample(cfg, engine, rows, sampling: Sampling, step: int) -> list:
    """The step's completions. In-process vLLM samples with torch's global generator: seeding it
    per step makes a resumed run sample exactly what an uninterrupted run would have."""
    torch.manual_seed(cfg.seed * 1_000_003 + step)
    return engine.generate(rows["prompt"], sampling)


class SyncRollouts:
    """The synchronous rollout source: each step, this rank's share of the step's prompts sampled
    on the engine with the weights of the last sync."""

    def __init__(self, cfg, engine, data, rank: int, world: int):
        self.cfg, self.engine, self.data, self.rank, self.world = cfg, engine, data, rank, world
        self.sampling = Sampling.from_config(cfg.rollout)
        self.resync: Callable[[], None] = lambda: None  # re-push the weights, on every rank

    def next(self, step: int):
        """(this rank's prompt rows, their completions, prompt-major) for step `step` (0-based);
        a restarted rollout server is re-synced first (rlx.rollout.sync.generate_synced)."""
        rows = step_rows(self.cfg, self.data, step, self.rank, self.world)
        draw = partial(sample, self.cfg, self.engine, rows, self.sampling, step)
        return rows, generate_synced(self.engine, draw, self.resync)

    def syncing(self) -> contextlib.AbstractContextManager[None]:
        """The loop syncs the engine's weights inside this (nothing to order here)."""
        return contextlib.nullcontext()

    def metrics(self) -> dict:
        return {}

    def close(self) -> None:
        pass


@dataclass
class Batch:
    """One step's rollouts as the producer made them."""

    rows: object
    completions: list
    version: int  # the source's sync count when generation began
    restarted: ServerRestarted | None = None  # met a restarted server: no completions
    resyncs: int = 0  # the source's re-pushes when generation began


class LockedEngine:
    """The engine as the loop's other users see it while the producer runs: each call holds the
    source's engine lock (in-process engines serve one caller at a time)."""

    def __init__(self, engine, lock: threading.Lock):
        self._engine, self._lock = engine, lock

    def __getattr__(self, name: str):
        attr = getattr(self._engine, name)
        if not callable(attr):
            return attr

        def locked(*args, **kwargs):
            with self._lock:
                return attr(*args, **kwargs)

        return locked


class AsyncRollouts:
    """The asynchronous rollout source (see the module docstring): a producer thread runs up to
    rollout.max_staleness steps ahead of the learner on the newest synced weights."""

    def __init__(self, cfg, engine, data, rank: int, world: int):
        if cfg.algo.tis_cap <= 0 and cfg.rollout.max_staleness > 0:
            raise ConfigError(
                "rollout.async=true trains on completions of older weights, which the loss "
                "corrects by importance sampling: set algo.tis_cap > 0 (e.g. 2.0)"
            )
        self.cfg, self.data, self.rank, self.world = cfg, data, rank, world
        self.k = cfg.rollout.max_staleness
        self.sampling = Sampling.from_config(cfg.rollout)
        self._raw = engine
        self._lock = threading.Lock()  # engine use: generation, weight syncs, evaluations
        self.engine = LockedEngine(engine, self._lock)
        self.resync: Callable[[], None] = lambda: None  # re-push the weights, on every rank
        self._cond = threading.Condition()  # guards everything below
        self.version = 0  # weight syncs seen
        self._resyncs = 0  # re-pushes after a restarted rollout server
        self._ready: dict[int, Batch] = {}
        self._asked = -1  # the step the learner asked for last
        self._begun = -1  # the last step the producer began sampling (under the engine lock)
        self._awaiting_resync = False  # the producer waits for a re-push (begins nothing)
        self._thread: threading.Thread | None = None
        self._stop = False
        self._error: BaseException | None = None
        self._producer_wait = self._trainer_wait = 0.0
        self._waiting_since: float | None = None  # when the producer began waiting its turn
        self._since = time.perf_counter()
        self._step_stats: dict = {}

    # ------------------------------------------------------------------ the learner's side

    def next(self, step: int):
        """Step `step`'s rows and completions (see SyncRollouts.next): the producer's batch, or,
        when it is more than max_staleness versions old, a fresh one sampled now (counted). When
        a rank met a restarted rollout server, every rank re-pushes the weights here first."""
        began = time.perf_counter()
        with self._cond:
            if self._thread is None:
                self._start(step)
            self._asked = step
            self._cond.notify_all()
            while step not in self._ready and self._error is None:
                self._cond.wait()
            if self._error is not None:
                raise RuntimeError(f"the rollout producer failed: {self._error}") from self._error
            batch = self._ready.pop(step)
            queued = len(self._ready)
            self._trainer_wait += time.perf_counter() - began
            version = self.version
        dropped = 0
        if batch.restarted is None and version - batch.version > self.k:
            dropped = len(batch.completions)
            batch = self._generate(step, batch.rows)
        if agree(self._raw, batch.restarted is not None):  # every rank, every step
            batch = self._recover(step, batch)
        self._step_stats = {
            "staleness": version - batch.version,
            "completions": len(batch.completions),
            "dropped": dropped,
            "queue": queued,
        }
        return batch.rows, batch.completions

    def _recover(self, step: int, batch: Batch) -> Batch:
        """A rank met a restarted rollout server: re-push the current weights (every rank, here,
        on the learner's thread) and sample this rank's batch again if it was lost."""
        if batch.restarted is not None:
            print(f"rollout: {batch.restarted}")
        with self._lock:
            self.resync()
            with self._cond:
                self._resyncs += 1
                self._cond.notify_all()
        if batch.restarted is None:
            return batch
        batch = self._generate(step, batch.rows)
        if batch.restarted is not None:  # again, right after the re-push: the run's error
            raise batch.restarted
        return batch

    @contextlib.contextmanager
    def syncing(self):
        """The loop pushes new weights inside this: no generation meanwhile; the version counts
        up when the sync went through."""
        began = time.perf_counter()
        with self._cond:  # the producer takes its turns first (see "A fixed schedule")
            while not self._producer_caught_up():
                self._cond.wait()
        with self._lock:
            waited = time.perf_counter() - began
            yield
            with self._cond:
                self.version += 1
                self._trainer_wait += waited
                self._cond.notify_all()

    def _producer_caught_up(self) -> bool:
        """(Under _cond.) The producer has begun every step it may begin now, or will begin none
        (not started, stopped, failed, or waiting for a re-push)."""
        thread = self._thread
        if thread is None or not thread.is_alive() or self._stop or self._error is not None:
            return True
        return self._awaiting_resync or self._begun >= min(self._asked + self.k, self.cfg.steps - 1)

    def metrics(self) -> dict:
        """The step's async/* metrics (every rank calls it at the same point: the histogram and
        the drops are summed over ranks): completions per staleness 0..k in the step's batch, the
        completions dropped as too stale, the batches queued after the step's was taken, and
        the shares of wall time since the last call the learner waited for rollouts (or for a
        sync to get the engine) and the producer waited for the learner (this rank's)."""
        s = self._step_stats
        counts = torch.zeros(self.k + 2)
        if s:
            counts[s["staleness"]] += s["completions"]  # <= k: next() dropped older ones
            counts[-1] = s["dropped"]
        counts = distributed.reduce(counts, "sum")
        with self._cond:
            now = time.perf_counter()
            wall = max(now - self._since, 1e-9)
            producer_wait = self._producer_wait
            if self._thread is not None and self._waiting_since is not None:
                producer_wait += now - self._waiting_since
                self._waiting_since = now
            row = {f"async/staleness_{i}": int(counts[i]) for i in range(self.k + 1)}
            row |= {
                "async/dropped": int(counts[-1]),
                "async/queue": s.get("queue", 0),
                "async/trainer_idle": min(self._trainer_wait / wall, 1.0),
                "async/generator_idle": min(producer_wait / wall, 1.0),
            }
            self._since, self._trainer_wait, self._producer_wait = now, 0.0, 0.0
        return row

    def close(self) -> None:
        """Stop the producer (after the generation under way) and drop what it queued."""
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join()
        self._ready.clear()

    # ------------------------------------------------------------------ the producer

    def _start(self, step: int) -> None:
        """Start producing at the learner's first step (a resumed run: the checkpoint's)."""
        self._thread = threading.Thread(
            target=self._produce, args=(step,), name=f"rollouts-rank{self.rank}", daemon=True
        )
        self._thread.start()

    def _produce(self, step: int) -> None:
        try:
            while step < self.cfg.steps:
                if not self._wait_turn(step):
                    return
                batch = self._generate(
                    step, step_rows(self.cfg, self.data, step, self.rank, self.world)
                )
                with self._cond:
                    self._ready[step] = batch
                    self._cond.notify_all()
                if batch.restarted is not None and not self._wait_resync(batch.resyncs):
                    return
                step += 1
        except BaseException as err:  # handed to the learner, which raises it
            with self._cond:
                self._error = err
                self._cond.notify_all()

    def _wait_turn(self, step: int) -> bool:
        """Block until the learner asked for step - k (False: stop). The wait counts as idle."""
        return self._wait(lambda: self._asked >= step - self.k)

    def _wait_resync(self, seen: int) -> bool:
        """Block until the learner re-pushed the weights after `seen` re-pushes (False: stop):
        the producer met a restarted server, and sampling on before the re-push would meet it
        again. The wait counts as idle."""
        with self._cond:
            self._awaiting_resync = True
            self._cond.notify_all()  # a sync waiting for the producer's turn goes ahead
        try:
            return self._wait(lambda: self._resyncs > seen)
        finally:
            with self._cond:
                self._awaiting_resync = False

    def _wait(self, ready: Callable[[], bool]) -> bool:
        with self._cond:
            self._waiting_since = time.perf_counter()
            while not self._stop and not ready():
                self._cond.wait()
            self._producer_wait += time.perf_counter() - self._waiting_since
            self._waiting_since = None
            return not self._stop

    def _generate(self, step: int, rows) -> Batch:
        """Sample `rows` on the engine's current weights, holding the engine lock; the completions
        of in-process engines carry the version they were sampled on. A restarted rollout server
        gives an empty batch marked with it (the learner re-pushes, see the module docstring)."""
        began = time.perf_counter()
        with self._lock:
            waited = time.perf_counter() - began
            with self._cond:
                version = self.version
                self._begun = max(self._begun, step)
                self._cond.notify_all()
            try:
                completions = sample(self.cfg, self._raw, rows, self.sampling, step)
            except ServerRestarted as err:  # (re-pushes count up under this lock too)
                return Batch(rows, [], version, err, self._resyncs)
        if threading.current_thread() is self._thread:
            with self._cond:
                self._producer_wait += waited
        for c in completions:
            if c.weight_version is None:
                c.weight_version = version
        return Batch(rows, completions, version)
