"""Merged weights of an adapter-wrapped model, for every PEFT method alike.

PEFT merges an adapter into the base weight in place and unmerges it by subtraction (MiSS: by a
matrix inverse), which leaves rounding behind in the base weight at every merge/unmerge cycle: with
a sync every step that drift adds up. Here the base weights are copied before the merge and copied
back after the unmerge, so they come back bit for bit.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


def is_adapted(model) -> bool:
    """A PEFT model (an adapter is trained)."""
    return hasattr(model, "peft_config")


def tuner_layers(model) -> dict[str, torch.nn.Module]:
    """{module name: PEFT tuner layer} of the model (names as in model.named_modules())."""
    from peft.tuners.tuners_utils import BaseTunerLayer  # deferred: peft imports transformers

    return {n: m for n, m in model.named_modules() if isinstance(m, BaseTunerLayer)}


@contextmanager
def merged(model, layers=None):
    """The adapter merged into the base weights of `layers` (default all) inside the block; the
    base weights are restored exactly afterwards."""
    layers = list(tuner_layers(model).values()) if layers is None else list(layers)
    weights = [layer.get_base_layer().weight for layer in layers]
    saved = [w.detach().clone() for w in weights]
    with torch.no_grad():
        for layer in layers:
            layer.merge()
    try:
        yield
    finally:
        with torch.no_grad():
            for layer in layers:
                layer.unmerge()
            for w, orig in zip(weights, saved, strict=True):
                w.copy_(orig)


def merged_weights(model) -> list[tuple[str, torch.Tensor]]:
    """HF-named weights of a PEFT model with its adapter merged in (copies): the names and tensors
    `merge_and_unload().state_dict()` would give, without changing the model."""
    base = model.get_base_model()
    with merged(base):
        return _hf_weights(base)


def base_weights(model) -> list[tuple[str, torch.Tensor]]:
    """HF-named weights of a PEFT model without its adapter (copies): the base an engine serving
    the adapter through LoRA requests must hold (for lora and mica: W0 itself)."""
    return _hf_weights(model.get_base_model())


def _hf_weights(base) -> list[tuple[str, torch.Tensor]]:
    """The base model's state dict under HF names: each tuner layer's base weight under the
    layer's own name, the adapters' parameters and buffers left out."""
    prefixes = tuple(f"{name}." for name in tuner_layers(base))
    out = []
    for name, tensor in base.state_dict().items():
        if ".base_layer." in name:
            out.append((name.replace(".base_layer.", "."), tensor.detach().clone()))
        elif not name.startswith(prefixes):  # an adapter's own parameter or buffer
            out.append((name, tensor.detach().clone()))
    return out


def effective_weights(model, names: list[str]) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF name, weight [O, I] as the forward pass sees it) for each name of `names`, e.g.
    "model.layers.0.self_attn.q_proj.weight": the adapter merged in where there is one."""
    base = model.get_base_model() if is_adapted(model) else model
    layers = tuner_layers(base) if is_adapted(model) else {}
    params = dict(base.named_parameters())
    for name in names:
        module_name = name.removesuffix(".weight")
        if module_name in layers:
            with merged(base, [layers[module_name]]):
                weight = layers[module_name].get_base_layer().weight.detach().clone()
            yield name, weight
        else:
            yield name, params[name].detach()
