"""The one path by which weights reach a rollout engine, and generation that survives a restarted
rollout server.

Every learner pushes weights the same way: `push_weights` opens one versioned update on the engine
(`engine.weight_update(version)`: rollout servers pause, take every chunk, then resume with the new
version; in-process engines load each chunk as it comes) and loads the chunks into it in order.
What the chunks hold is the caller's strategy: the PG trainer's merged weights, a decoder layer at
a time under ZeRO-3, or the adapter's base (rlx/weight_sync.py); the ES learners' evolved tensors.

`chunks` is a function that makes the chunks, not the chunks themselves, so that an update can be
made again from the start (under ZeRO-3 making them is a collective every rank joins). That is
what a failed sync to rollout servers needs: the engine rolls the update back (every server
resumed, `SyncFailed`, rlx/rollout/server.py), and `push_weights` runs the whole update once
more. Every rank calls it at the same point and learns whether rank 0's update failed
(`distributed.agree`), so all of them make the chunks again together; a second failure is the
run's error.

`generate_synced` is the other half: a rollout server that reports weights of no version of this
run (restarted by a supervisor) makes `generate` raise `ServerRestarted` on the rank that saw
it; every rank then re-pushes the current weights (the engine re-makes the weight-sync group;
with adapter.sync=adapter the base model goes again before the adapter, rlx/weight_sync.py)
and generates again. The asynchronous source does the same at its own agreed point
(rlx.rollout_source.AsyncRollouts.next), since its producer thread must not push.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch

from rlx import distributed
from rlx.rollout.server import ServerRestarted, SyncFailed
from rlx.rollout.weight_transfer import RolloutWorkerError

Chunk = list[tuple[str, torch.Tensor]]  # HF-named tensors loaded together


def push_weights(engine, chunks: Callable[[], Iterable[Chunk]], version: int | None = None) -> None:
    """Load the weights `chunks()` yields into `engine` as one update, which takes `version`
    (default: the engine's previous version + 1). A rolled-back update is run once more on every
    rank; a second failure is one RolloutWorkerError naming the server and the phase."""
    failure = _attempt(engine, chunks, version)
    if not agree(engine, failure is not None):
        return
    failure = _attempt(engine, chunks, version)
    if failure is not None:
        raise RolloutWorkerError(f"weight sync failed, and again on its retry: {failure}")


def _attempt(engine, chunks, version) -> SyncFailed | None:
    try:
        with engine.weight_update(version):
            for chunk in chunks():
                engine.update_weights(chunk)
    except SyncFailed as err:
        return err
    return None


def generate_synced(engine, generate: Callable[[], list], resync: Callable[[], None]) -> list:
    """generate() on `engine`; when a rank met a restarted rollout server, every rank resyncs
    (`resync` pushes the current weights, e.g. with push_weights) and generates again, once."""
    try:
        completions, restarted = generate(), None
    except ServerRestarted as err:
        completions, restarted = None, err
    if not agree(engine, restarted is not None):
        return completions
    if restarted is not None:
        print(f"rollout: {restarted}")
    resync()
    return generate()


def agree(engine, flag: bool) -> bool:
    """`flag` on any rank (every rank calls it at the same point), for engines that roll
    updates back and check versions (rollout servers: `transactional`); for the others `flag`
    as it is, with no collective, since their updates and generations cannot fail this way and
    their learners (ES) need not call at the same points on every rank."""
    if getattr(engine, "transactional", False):
        return distributed.agree(flag)
    return flag
