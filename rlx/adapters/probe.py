"""Cheap spectral diagnostics a training loop can log every few steps (`adapter.diagnostics_every`).

A SpectralProbe keeps, for a few matrices spread over the layers and layer types, the starting
weight W0 and its top-k singular vectors (one SVD each, when built). `metrics(model)` then costs a
few matrix products per matrix: the mean update alignment, principal share and bf16 sparsity
(definitions in rlx/adapters/diagnostics.py), as `diag/*` metrics.

Product adapters (lora, minor, mica, pissa, adalora: delta = c B A) get dW = delta_t - delta_0
from their factors in fp32: merged into a bf16 base, c B A is mostly below one bf16 step and the
metrics would measure rounding. DoRA and MiSS (no product) and full fine-tuning read the weight as
the forward pass sees it.
"""

from __future__ import annotations

import math

import torch

from rlx.adapters.diagnostics import principal_share, update_alignment
from rlx.adapters.diff import weight_delta
from rlx.adapters.guard import target_matrix_names, top_singular_vectors
from rlx.adapters.merge import effective_weights, is_adapted, tuner_layers
from rlx.config import AdapterConfig, ConfigError


def spread(names: list[str], count: int) -> list[str]:
    """`count` names evenly spaced over the list (all of them when there are fewer)."""
    if count >= len(names):
        return list(names)
    step = (len(names) - 1) / max(count - 1, 1)
    return [names[round(i * step)] for i in range(count)]


def check_probe_sharding(cfg: AdapterConfig, zero_stage: int) -> None:
    """The probe reads whole weights: under ZeRO-3 each rank holds a slice of them (full
    fine-tuning; adapters under ZeRO-3 are refused elsewhere). One line at set-up."""
    if cfg.diagnostics_every and zero_stage == 3:
        raise ConfigError(
            f"adapter.diagnostics_every={cfg.diagnostics_every} under DeepSpeed ZeRO-3: the probe "
            "reads whole weights and ZeRO-3 partitions them; set adapter.diagnostics_every=0 or "
            "use launch/cpu_2proc_zero2.yaml"
        )


def factor_delta(layer) -> torch.Tensor | None:
    """[O, I] c B A of a product adapter layer (its adapters summed), computed in fp32; None for a
    layer whose update is no product (DoRA, MiSS)."""
    if not hasattr(layer, "lora_A") or any(layer.use_dora.get(a, False) for a in layer.lora_A):
        return None
    total = None
    for adapter in layer.lora_A:
        a, b = layer.lora_A[adapter], layer.lora_B[adapter]
        a = (a.weight if isinstance(a, torch.nn.Module) else a).float()  # [r, I]
        b = (b.weight if isinstance(b, torch.nn.Module) else b).float()  # [O, r]
        scale = layer.scaling[adapter]
        if hasattr(layer, "lora_E"):  # AdaLoRA: B (E * A) scaled by 1 / (kept ranks + 1e-5)
            a = a * layer.lora_E[adapter].float()
            scale = scale / (float(layer.ranknum[adapter]) + 1e-5)
        delta = scale * (b @ a)
        delta = delta.T if getattr(layer, "fan_in_fan_out", False) else delta
        total = delta if total is None else total + delta
    return total


def _layer(model, name: str):
    """The PEFT tuner layer of HF weight `name`, or None (no adapter there)."""
    if not is_adapted(model):
        return None
    return tuner_layers(model.get_base_model()).get(name.removesuffix(".weight"))


def _nanmean(values: list[float]) -> float:
    """Mean of the non-nan values (a matrix with dW = 0 has no alignment), nan if none."""
    kept = [v for v in values if not math.isnan(v)]
    return sum(kept) / len(kept) if kept else math.nan


class SpectralProbe:
    """W0 and U_k, V_k of a few target matrices; `metrics(model)` compares the model against them.
    Build it before any training step (and before a resume loads trained weights)."""

    def __init__(self, model, target_modules, top_k: int = 16, matrices: int = 4):
        self.names = spread(target_matrix_names(model, target_modules), matrices)
        self.start = {}
        with torch.no_grad():
            for name, merged in effective_weights(model, self.names):
                if merged.dim() != 2 or merged.numel() == 0:
                    raise ConfigError(
                        f"adapter.diagnostics_every: {name} is partitioned (DeepSpeed ZeRO-3); "
                        "the probe needs whole weights: set adapter.diagnostics_every=0"
                    )
                w0, delta0 = self._start_weight(model, name, merged)
                u, v = top_singular_vectors(w0, min(top_k, *w0.shape))
                self.start[name] = (w0, delta0, u.to(w0), v.to(w0))

    @staticmethod
    def _start_weight(model, name: str, merged: torch.Tensor):
        """(W0 in fp32, c B0 A0 or None): a product adapter's W0 is base + c B0 A0 in fp32."""
        layer = _layer(model, name)
        delta0 = None if layer is None else factor_delta(layer)
        if delta0 is None:
            return merged.detach().float().clone(), None
        base = layer.get_base_layer().weight.detach().float()
        return base + delta0, delta0.clone()

    def _update(self, model, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(dW, Wt) [O, I] in fp32: dW from the factors (product adapters, Wt = W0 + dW) or
        from the weight the forward pass sees."""
        w0, delta0, _, _ = self.start[name]
        if delta0 is not None:
            dw = factor_delta(_layer(model, name)) - delta0
            return dw, w0 + dw
        wt = next(effective_weights(model, [name]))[1].float()
        return weight_delta(w0, wt), wt

    @torch.no_grad()
    def metrics(self, model) -> dict[str, float]:
        """{"diag/alignment", "diag/principal_share", "diag/bf16_sparsity"}: means over the
        probed matrices; alignment and share skip a matrix while its dW is 0 (nan if all do)."""
        align, share, sparse = [], [], []
        for name in self.names:
            w0, _, u, v = self.start[name]
            dw, wt = self._update(model, name)  # [O, I]
            align.append(update_alignment(dw, u, v))
            share.append(principal_share(dw, u, v))
            sparse.append(float((weight_delta(w0, wt, torch.bfloat16) == 0).float().mean()))
        return {
            "diag/alignment": _nanmean(align),
            "diag/principal_share": _nanmean(share),
            "diag/bf16_sparsity": _nanmean(sparse),
        }
