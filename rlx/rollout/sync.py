"""Weight pushes and generation that survive a failed sync or a restarted rollout server.

A weight update comes from an iterator of chunks (under ZeRO-3 each chunk is a gather that
every trainer rank runs), so retrying one needs the chunks again: `push_weights` takes a
function that makes them, and runs the whole update once more when the engine rolled it back
(`SyncFailed`, rlx/rollout/server.py: every server resumed). Every rank calls it at the same
point, and every rank learns whether rank 0's update failed (`distributed.agree`), so all of them
iterate the chunks again together.

`generate_synced` is the other half: a rollout server that reports weights of no version of this
run (restarted by a supervisor) makes `generate` raise `ServerRestarted` on the rank that saw
it; every rank then re-pushes the current weights (the engine re-makes the weight-sync group)
and generates again.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from rlx import distributed
from rlx.rollout.server import ServerRestarted, SyncFailed
from rlx.rollout.weight_transfer import RolloutWorkerError


def push_weights(engine, chunks_fn: Callable[[], Iterable], version: int | None = None) -> None:
    """One weight update of `engine` from the chunks `chunks_fn()` yields, to `version` (the
    trainer step of the weights; None: the engine's last + 1). A rolled-back update is run
    once more on every rank; a second failure is one RolloutWorkerError naming the server and
    the phase."""
    failure = _attempt(engine, chunks_fn, version)
    if not _agree(engine, failure is not None):
        return
    failure = _attempt(engine, chunks_fn, version)
    if failure is not None:
        raise RolloutWorkerError(f"weight sync failed, and again on its retry: {failure}")


def _attempt(engine, chunks_fn, version) -> SyncFailed | None:
    try:
        with engine.weight_update(version):
            for chunk in chunks_fn():
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
    if not _agree(engine, restarted is not None):
        return completions
    if restarted is not None:
        print(f"rollout: {restarted}")
    resync()
    return generate()


def _agree(engine, flag: bool) -> bool:
    """`flag` on any rank, for engines that roll updates back and check versions (rollout
    servers: `transactional`); for the others `flag` as it is, with no collective, since
    their updates and generations cannot fail this way and their learners (ES) need not call
    at the same points on every rank."""
    if getattr(engine, "transactional", False):
        return distributed.agree(flag)
    return flag
