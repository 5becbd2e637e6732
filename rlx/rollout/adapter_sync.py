"""An engine that serves the trainer's latest LoRA adapter on every prompt (`adapter.sync=adapter`).

The trainer saves its adapter in PEFT format (a few MB instead of the whole model) under a new
name per sync; this wrapper makes every `generate` call carry it as a LoRA request, so the
sampler's logprobs (and the logprob-gap alarm) are the adapted model's. A new name per sync makes
vLLM load the new weights (it caches adapters by id); the previous version is unloaded and its
folder deleted. The engine must hold the adapter's base model (rlx/weight_sync.py pushes it first
where the engine may hold other weights). Which adapter methods vLLM can serve this way:
rlx.adapters.adapter_sync_fallback.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Sequence
from pathlib import Path

from rlx.rollout.base import Adapter, Prompt, Sampling, encode_prompts


class AdapterSyncEngine:
    """A rollout engine whose generations use the newest adapter `push` saved. Everything else
    (update_weights, weight_update, close, ...) is the wrapped engine's."""

    def __init__(self, engine, folder: str | Path, rank: int = 0):
        self.engine, self.tokenizer = engine, engine.tokenizer
        self.folder, self.rank = Path(folder).resolve(), rank
        self.version = 0
        self.current: Adapter | None = None  # None: the base model (before the first push)

    def __getattr__(self, name):
        return getattr(self.__dict__["engine"], name)

    def push(self, save: Callable[[str], None]) -> Adapter:
        """Save the next adapter version with `save(folder)` (a PEFT model's save_pretrained) and
        serve it from now on; the previous version is unloaded from the engine and deleted."""
        self.version += 1
        name = f"rlx-rank{self.rank}-v{self.version}"
        path = self.folder / name
        save(str(path))
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
