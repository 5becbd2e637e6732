"""The one path by which weights reach a rollout engine.

Every learner pushes weights the same way: `push_weights` opens one versioned update on the engine
(`engine.weight_update(version)`: rollout servers pause, take every chunk, then resume with the new
version; in-process engines load each chunk as it comes) and loads the chunks into it in order.
What the chunks hold is the caller's strategy: the PG trainer's merged weights, a decoder layer at
a time under ZeRO-3, or the adapter's base (rlx/weight_sync.py); the ES learners' evolved tensors.

`chunks` is a function that makes the chunks, not the chunks themselves, so that an update can be
made again from the start (under ZeRO-3 making them is a collective every rank joins).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch

Chunk = list[tuple[str, torch.Tensor]]  # HF-named tensors loaded together


def push_weights(engine, chunks: Callable[[], Iterable[Chunk]], version: int | None = None) -> None:
    """Load the weights `chunks()` yields into `engine` as one update, which takes `version`
    (default: the engine's previous version + 1)."""
    with engine.weight_update(version):
        for chunk in chunks():
            engine.update_weights(chunk)
