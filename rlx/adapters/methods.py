"""Adapter methods: one builder per `adapter.method`, a plain name -> function dict (METHODS).

Every method is PEFT's except `minor`, the minor-component init (MiLoRA, Wang et al. 2024): PEFT
0.21 has no `milora`. Its `mica` (MiCA) is another minor-component method and is offered as such:
B = the r left singular vectors of W0 with the smallest singular values, frozen; A = 0, trained.
`minor` instead mirrors PiSSA at the other end of the spectrum (PEFT's pissa_init with the last r
triplets): A = sqrt(S_r / s) V_r^T, B = U_r sqrt(S_r / s) from the r smallest singular triplets of
W0 (s = alpha / rank), and the base weight becomes W0 - s B A, so the model starts unchanged.

PEFT is imported inside the builders: it imports transformers (seconds), which full fine-tuning
and `--show-config` never need.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from rlx.config import AdapterConfig, ConfigError


def _lora_config(cfg: AdapterConfig, **extra):
    from peft import LoraConfig  # deferred: peft

    return LoraConfig(
        r=cfg.rank,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=list(cfg.target_modules),
        task_type="CAUSAL_LM",
        **extra,
    )


def _peft(model, peft_config):
    from peft import get_peft_model  # deferred: peft

    return get_peft_model(model, peft_config)


def lora(model, cfg: AdapterConfig, total_steps: int | None = None):
    """LoRA: W0 + s B A, B = 0 at the start."""
    return _peft(model, _lora_config(cfg))


def dora(model, cfg: AdapterConfig, total_steps: int | None = None):
    """DoRA: a trained magnitude per output row times the direction (W0 + s B A) / ||.||."""
    return _peft(model, _lora_config(cfg, use_dora=True))


def pissa(model, cfg: AdapterConfig, total_steps: int | None = None):
    """PiSSA: B A starts as the top-r singular triplets of W0, the base keeps the residual."""
    init = "pissa" if cfg.pissa_niter == 0 else f"pissa_niter_{cfg.pissa_niter}"
    return _peft(model, _lora_config(cfg, init_lora_weights=init))


def mica(model, cfg: AdapterConfig, total_steps: int | None = None):
    """PEFT's MiCA: B = the r minor left singular vectors of W0 (frozen), A = 0 (trained)."""
    _check_rank_fits(model, cfg)
    return _peft(model, _lora_config(cfg, init_lora_weights="mica"))


def minor(model, cfg: AdapterConfig, total_steps: int | None = None):
    """MiLoRA-style minor-component init on PEFT's LoRA (module docstring)."""
    _check_rank_fits(model, cfg)
    peft_model = _peft(model, _lora_config(cfg))
    for layer in lora_layers(peft_model):
        for name in layer.lora_A:
            minor_init(layer, name)
    return peft_model


def miss(model, cfg: AdapterConfig, total_steps: int | None = None):
    """MiSS (PEFT): one shared block of r columns per matrix, updated by shard sharing."""
    from peft import MissConfig  # deferred: peft

    peft_config = MissConfig(
        r=cfg.rank,
        miss_dropout=cfg.dropout,
        target_modules=list(cfg.target_modules),
        task_type="CAUSAL_LM",
    )
    return _peft(model, peft_config)


def adalora(model, cfg: AdapterConfig, total_steps: int | None = None):
    """AdaLoRA (PEFT): B diag(E) A with ranks pruned from `rank` to `adalora.target_rank` on a
    budget over the run's allocation steps (`total_steps`: the PG loop's steps x ppo_epochs x
    mini_batches; a rollout step that applies fewer updates leaves its other steps unused, so the
    budget ends with the run, rlx.adapters.StepHooks). The loop must add `extra_loss` to its loss
    and call `update_and_allocate` after each optimizer step (install_step_hooks does)."""
    from peft import AdaLoraConfig  # deferred: peft

    a = cfg.adalora
    total = a.total_step or total_steps
    if total is None:
        raise ConfigError("adapter.adalora.total_step: set it (the run's allocation steps)")
    if a.tinit >= total - a.tfinal:
        raise ConfigError(
            f"adapter.adalora: tinit ({a.tinit}) must be < total_step ({total}) - tfinal "
            f"({a.tfinal}) for AdaLoRA's rank budget to have steps"
        )
    peft_config = AdaLoraConfig(
        init_r=cfg.rank,
        target_r=a.target_rank,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=list(cfg.target_modules),
        tinit=a.tinit,
        tfinal=a.tfinal,
        deltaT=a.delta_t,
        beta1=a.beta1,
        beta2=a.beta2,
        orth_reg_weight=a.orth_reg_weight,
        total_step=total,
        task_type="CAUSAL_LM",
    )
    return _peft(model, peft_config)


METHODS: dict[str, Callable] = {
    "lora": lora,
    "dora": dora,
    "pissa": pissa,
    "minor": minor,
    "mica": mica,
    "miss": miss,
    "adalora": adalora,
}


def lora_layers(model) -> list:
    """The model's PEFT LoRA layers (LoRA, DoRA, PiSSA, minor, MiCA and AdaLoRA all are)."""
    from peft.tuners.lora import LoraLayer  # deferred: peft

    return [m for m in model.modules() if isinstance(m, LoraLayer)]


@torch.no_grad()
def minor_init(layer, adapter: str) -> None:
    """A, B from the r smallest singular triplets of the base weight W0 [O, I]; base -= s B A."""
    base = layer.get_base_layer()
    weight = base.weight.float()  # [O, I]
    r, scale = layer.r[adapter], layer.scaling[adapter]
    u, s, vh = torch.linalg.svd(weight, full_matrices=False)  # s descending
    s_r = s[-r:] / scale  # [r]
    lora_a = torch.diag(s_r.sqrt()) @ vh[-r:]  # [r, I]
    lora_b = u[:, -r:] @ torch.diag(s_r.sqrt())  # [O, r]
    layer.lora_A[adapter].weight.data = lora_a.to(layer.lora_A[adapter].weight.dtype)
    layer.lora_B[adapter].weight.data = lora_b.to(layer.lora_B[adapter].weight.dtype)
    base.weight.data = (weight - scale * lora_b @ lora_a).to(base.weight.dtype)


def _check_rank_fits(model, cfg: AdapterConfig) -> None:
    """The minor-component inits need r <= min(O, I) of every target matrix, and with the guard
    k + r <= min(O, I): else the top-k directions it removes overlap the r minor ones the init
    starts on (it would cut into B0 A0; for mica, zero columns of the frozen B). One clear line."""
    k, r = cfg.principal_guard, cfg.rank
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and name.rsplit(".", 1)[-1] in cfg.target_modules:
            smallest = min(module.weight.shape)
            if r > smallest:
                raise ConfigError(
                    f"adapter.rank must be <= {smallest} (the smaller side of {name}) for "
                    f"method={cfg.method}, got {r}"
                )
            if k + r > smallest:
                size = "x".join(str(n) for n in module.weight.shape)
                raise ConfigError(
                    f"adapter.principal_guard + adapter.rank must be <= {smallest} for "
                    f"method={cfg.method} ({name} is {size}): {k} + {r} > {smallest}, the guard "
                    "would remove part of the minor init; lower one of them"
                )
