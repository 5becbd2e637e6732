"""How the PG trainer's policy reaches its rollout engine: one strategy, chosen where the engine is
made, behind one call (`push(policy, version)`).

- MergedSync: the policy's HF-named weights (an adapter merged into copies, rlx.policy.export_
  weights), under ZeRO-3 gathered and sent a few decoder layers at a time (rlx.sharding.weight_
  chunks; every rank must take part).
- AdapterSync (adapter.sync=adapter, a method vLLM serves): the adapter alone, saved in PEFT
  format and served as a LoRA request on every prompt (rlx/rollout/adapter_sync.py); an engine
  that may hold other weights (a rollout server) takes the base model first.

`push(policy, version, full=True)` is the push after a restarted rollout server
(rlx.rollout.sync.generate_synced): everything the engine needs, as at the first push. A
restarted server has the base model from its disk, but under vLLM's version, without the
weight-sync group and without the adapter, so AdapterSync pushes the base again (which labels it
with the run's version and makes the group anew) and then the adapter; MergedSync's pushes are
all full.

Both go through rlx.rollout.sync.push_weights, the one path by which weights enter an engine.
"""

from __future__ import annotations

from rlx import sharding
from rlx.adapters import adapter_sync_fallback, base_weights
from rlx.policy import export_weights
from rlx.rollout.adapter_sync import AdapterSyncEngine
from rlx.rollout.sync import push_weights


class MergedSync:
    """Push every weight of the policy (see the module docstring)."""

    def __init__(self, engine):
        self.engine = engine  # the engine the loop generates with

    def push(self, policy, version: int | None = None, full: bool = False) -> None:
        """Every weight, always (`full`: see the module docstring)."""
        push_weights(self.engine, lambda: sharding.weight_chunks(policy, export_weights), version)


class AdapterSync:
    """Push the policy's adapter alone (see the module docstring). `push_base`: the engine may hold
    other weights (rollout servers), so the first push, and a full one, load the base model into
    it too."""

    def __init__(self, engine, folder, rank: int = 0, push_base: bool = False):
        self.engine = AdapterSyncEngine(engine, folder, rank)
        self.push_base = push_base
        self.base_pushed = False

    def push(self, policy, version: int | None = None, full: bool = False) -> None:
        """The adapter as the engine's next version; the base model first on the first push and
        when `full` (a restarted rollout server), where the engine may hold other weights."""
        if self.push_base and (full or not self.base_pushed):
            push_weights(self.engine.engine, lambda: [base_weights(policy)], version)
            self.base_pushed = True
        self.engine.push(policy.save_pretrained)


def weight_sync(engine, adapter_cfg, folder, rank: int = 0, push_base: bool = False):
    """The strategy for `engine` and an rlx.config.AdapterConfig: AdapterSync when adapter.sync=
    adapter and vLLM can serve the method (versions saved under `folder`), else MergedSync (rank 0
    says once why an adapter.sync=adapter run merges). Its `.engine` is the one to generate with."""
    fallback = adapter_sync_fallback(adapter_cfg)
    if fallback and rank == 0:
        print(fallback)
    if adapter_cfg.sync != "adapter" or fallback:
        return MergedSync(engine)
    return AdapterSync(engine, folder, rank, push_base)
