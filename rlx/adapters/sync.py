"""Which adapter methods an engine can serve as LoRA requests (`adapter.sync=adapter`).

vLLM serves a PEFT adapter on the base model it loaded, so only methods whose adapter is an
additive LoRA delta on the unchanged base qualify (lora, mica; rlx.config.adapter.ENGINE_ADAPTERS).
The others merge for the sync, and the run says so once (REFUSED has the reason per method). The
serving itself: rlx/rollout/adapter_sync.py; the choice of sync: rlx/weight_sync.py.
"""

from __future__ import annotations

from rlx.config.adapter import ENGINE_ADAPTERS

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
