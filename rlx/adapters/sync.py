"""Adapter-only sync to the rollout engine (`adapter.sync=adapter`), beside the merged sync.

After each update the trainer saves its adapter in PEFT format (a few MB instead of the whole
model) under a new name and version, and the engine serves it through LoRA requests: every
prompt of every `generate` call carries it, so the sampler's logprobs (and the logprob-gap alarm)
are the adapted model's. A new name per sync makes vLLM load the new weights (it caches adapters
by id); the previous version is unloaded and deleted.

vLLM serves a PEFT adapter on the base model it loaded, so only methods whose adapter is an
additive LoRA delta on the unchanged base qualify (lora, mica; rlx.config.adapter.ENGINE_ADAPTERS).
The others merge for the sync, and the run says so once (REFUSED has the reason per method).
"""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from pathlib import Path

from rlx.adapters.merge import base_weights
from rlx.config.adapter import ENGINE_ADAPTERS
from rlx.rollout.base import Adapter, Prompt, Sampling, encode_prompts

# why vLLM cannot serve these as LoRA requests (the first two are vllm/lora/peft_helper.py's)
REFUSED = {
    "dora": "vLLM does not support DoRA",
    "pissa": "vLLM refuses init_lora_weights=pissa (the trainer's base is W0 minus the "
    "principal triplets)",
    "minor": "the trainer's base is W0 minus the minor triplets, vLLM would add the adapter to W0",
    "adalora": "vLLM loads no lora_E (AdaLoRA's B diag(E) A)",
    "miss": "MiSS is no LoRA adapter",
}


def adapter_sync_fallback(cfg) -> str | None:
    """None when `cfg` (an AdapterConfig) syncs its adapter alone, else the one-line reason it
    syncs merged weights instead (adapter.sync=adapter with a method vLLM cannot serve)."""
    if cfg.sync != "adapter" or cfg.method in ENGINE_ADAPTERS:
        return None
    return (
        f"adapter.sync=adapter: {REFUSED[cfg.method]}, so method={cfg.method} syncs merged "
        "weights instead"
    )


class AdapterSyncEngine:
    """A rollout engine whose generations use the trainer's latest adapter. Everything else
    (update_weights, weight_update, close, ...) is the wrapped engine's."""

    def __init__(self, engine, folder: str | Path, rank: int = 0, push_base: bool = False):
        self.engine, self.tokenizer = engine, engine.tokenizer
        self.folder, self.rank = Path(folder).resolve(), rank
        self.version, self.push_base = 0, push_base
        self.current: Adapter | None = None  # None: the base model (before the first sync)

    def __getattr__(self, name):
        return getattr(self.__dict__["engine"], name)

    def sync(self, policy) -> Adapter:
        """Save `policy`'s adapter (a PEFT model) as the next version and serve it from now on;
        the previous version is unloaded from the engine and deleted."""
        if self.push_base and self.version == 0:  # e.g. a rollout server holding another run's
            with self.engine.weight_update():
                self.engine.update_weights(base_weights(policy))
        self.version += 1
        name = f"rlx-rank{self.rank}-v{self.version}"
        path = self.folder / name
        policy.save_pretrained(str(path))
        previous, self.current = self.current, Adapter(name, str(path))
        if previous is not None:
            self.engine.remove_adapters()
            shutil.rmtree(previous.path, ignore_errors=True)
        return self.current

    def _adapters(self, prompts: int) -> list[Adapter] | None:
        return None if self.current is None else [self.current] * prompts

    def generate(self, prompts: Sequence[Prompt], sampling: Sampling):
        ids = encode_prompts(self.tokenizer, prompts)
        return self.engine.generate_ids(ids, sampling, self._adapters(len(ids)))

    def generate_ids(self, prompt_ids, sampling: Sampling, adapters=None):
        adapters = adapters if adapters is not None else self._adapters(len(prompt_ids))
        return self.engine.generate_ids(prompt_ids, sampling, adapters)

    def prompt_logprobs(self, token_ids):
        """The adapted model's prompt logprobs (engines whose prompt_logprobs take `adapter`)."""
        if self.current is None:
            return self.engine.prompt_logprobs(token_ids)
        return self.engine.prompt_logprobs(token_ids, adapter=self.current)

    def close(self) -> None:
        self.engine.close()
        if self.current is not None:
            shutil.rmtree(self.current.path, ignore_errors=True)
