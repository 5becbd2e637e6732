"""The `adapter:` section (rlx/adapters/, docs/adapters.md): which adapter method trains the policy,
its knobs, the off-principal guard and the spectral diagnostics the PG loop logs."""

from __future__ import annotations

import dataclasses

from rlx.config.choices import AdapterMethod, AdapterSync
from rlx.config.core import ConfigError, knob, require

# the update of these is B @ A (times a constant): the guard projects the factors exactly
GUARDED_ADAPTERS = ("lora", "minor", "mica", "adalora")

# adapter.sync=adapter: the methods whose saved PEFT adapter vLLM serves exactly on the unchanged
# base model; the others merge for the sync (rlx/adapters/sync.py says why, once)
ENGINE_ADAPTERS = ("lora", "mica")


@dataclasses.dataclass
class AdaLoraConfig:
    """AdaLoRA's rank budget (PEFT's AdaLoraConfig; `adapter.rank` is its init_r). Its steps
    are allocation steps: ppo_epochs x mini_batches per rollout step, whether or not a step
    applies them all (rlx.adapters.StepHooks)."""

    target_rank: int = knob(8, help="average rank per matrix left at the end of the budget")
    tinit: int = knob(0, help="allocation steps before the rank budget starts shrinking")
    tfinal: int = knob(0, help="allocation steps at the end with the final budget fixed")
    delta_t: int = knob(1, help="re-allocate the ranks every k allocation steps")
    beta1: float = knob(0.85, help="EMA of the sensitivity")
    beta2: float = knob(0.85, help="EMA of the sensitivity's uncertainty")
    orth_reg_weight: float = knob(0.5, help="weight of the orthogonality penalty added to the loss")
    total_step: int | None = knob(
        None,
        help="allocation steps of the whole run (ppo_epochs x mini_batches per rollout step, "
        "applied or not); null = steps x ppo_epochs x mini_batches",
    )

    def __post_init__(self) -> None:
        require(self.target_rank >= 1, "target_rank", ">= 1", self.target_rank)
        require(self.tinit >= 0, "tinit", ">= 0", self.tinit)
        require(self.tfinal >= 0, "tfinal", ">= 0", self.tfinal)
        require(self.delta_t >= 1, "delta_t", ">= 1", self.delta_t)
        require(self.orth_reg_weight >= 0, "orth_reg_weight", ">= 0", self.orth_reg_weight)
        t = self.total_step
        require(t is None or t >= 1, "total_step", "null or >= 1", t)


@dataclasses.dataclass
class AdapterConfig:
    """What the policy-gradient loop trains: all weights (method none) or a PEFT adapter."""

    method: AdapterMethod = knob(
        "none",
        help="none = full fine-tuning; lora; dora (magnitude + direction); pissa (starts on the "
        "top-r singular triplets of W0); minor (MiLoRA-style: starts on the smallest r); mica "
        "(PEFT's MiCA: B = the r minor left singular vectors, frozen); miss; adalora",
    )
    rank: int = knob(16, help="adapter rank r (adalora: the initial rank; miss: the block size)")
    alpha: float = knob(32.0, help="LoRA-family scale numerator: scale = alpha / rank")
    dropout: float = knob(0.0, help="dropout on the adapter's input (lora family, miss, adalora)")
    target_modules: list[str] = knob(
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        help="module names that get adapters (method none: the matrices the guard acts on)",
    )
    pissa_niter: int = knob(
        0, help="pissa: 0 = exact SVD; n > 0 = PEFT's fast randomized SVD with n iterations"
    )
    adalora: AdaLoraConfig = knob(AdaLoraConfig(), help="AdaLoRA's rank budget")
    principal_guard: int = knob(
        0,
        help="k > 0: after every optimizer step remove the top-k principal part of each target "
        "matrix's update, dW <- (I - U_k U_k^T) dW (I - V_k V_k^T), U_k, V_k from W0's SVD; 0 = off",
    )
    guard_gradient: bool = knob(
        False,
        help="with principal_guard: also project each gradient the same way before the optimizer "
        "step, so AdamW's moments hold no principal direction (the after-step projection stays)",
    )
    sync: AdapterSync = knob(
        "merged",
        help="how the rollout engine gets the policy: merged = the merged weights; adapter = the "
        "adapter only (PEFT format), served through vLLM LoRA requests (lora, mica; the other "
        "methods fall back to merged); needs rollout.enable_lora and rollout.max_lora_rank >= rank",
    )
    diagnostics_every: int = knob(
        0, help="log the cheap spectral diagnostics (diag/*) every k steps; 0 = off"
    )
    diagnostics_top_k: int = knob(16, help="k of the principal subspace the diagnostics use")
    diagnostics_matrices: int = knob(
        4, help="matrices the per-step diagnostics sample (spread over layers and types)"
    )

    @property
    def enabled(self) -> bool:
        """An adapter is trained (False: full fine-tuning)."""
        return self.method != "none"

    def __post_init__(self) -> None:
        require(self.rank >= 1, "rank", ">= 1", self.rank)
        require(self.alpha > 0, "alpha", "> 0", self.alpha)
        require(0 <= self.dropout < 1, "dropout", "in [0, 1)", self.dropout)
        require(bool(self.target_modules), "target_modules", "a non-empty list", [])
        require(self.pissa_niter >= 0, "pissa_niter", ">= 0", self.pissa_niter)
        require(self.principal_guard >= 0, "principal_guard", ">= 0", self.principal_guard)
        require(self.diagnostics_every >= 0, "diagnostics_every", ">= 0", self.diagnostics_every)
        require(self.diagnostics_top_k >= 1, "diagnostics_top_k", ">= 1", self.diagnostics_top_k)
        n = self.diagnostics_matrices
        require(n >= 1, "diagnostics_matrices", ">= 1", n)
        if self.principal_guard and self.method not in ("none", *GUARDED_ADAPTERS):
            # dora rescales W0's columns, miss shares blocks, pissa trains the principal triplets
            # themselves: their update is no product B @ A whose factors can be projected
            raise ConfigError(
                f"principal_guard={self.principal_guard} works with method none (full "
                f"fine-tuning) and {', '.join(GUARDED_ADAPTERS)} (updates B @ A), not "
                f"method={self.method}"
            )
        if self.guard_gradient and not self.principal_guard:
            raise ConfigError(
                "adapter.guard_gradient=true projects the gradient off the principal guard's "
                "subspaces: set adapter.principal_guard=k (k > 0) too"
            )
        if self.method == "adalora":
            r = self.adalora.target_rank
            require(r <= self.rank, "adalora.target_rank", f"<= rank ({self.rank})", r)
        if self.sync == "adapter" and not self.enabled:
            require(False, "sync", "merged with method none (no adapter to serve)", self.sync)


def check_adapter_sync(adapter: AdapterConfig, rollout) -> None:
    """adapter.sync=adapter serves the adapter through the engine's LoRA requests: the engine must
    be built for them (enable_lora) with room for its rank. Methods vLLM cannot serve merge
    instead (rlx.adapters.sync), so they need nothing of the engine."""
    if adapter.sync != "adapter" or adapter.method not in ENGINE_ADAPTERS:
        return
    if rollout.backend == "hf":
        raise ConfigError(
            "adapter.sync=adapter needs rollout.backend=vllm or server (the hf engine serves no "
            "LoRA adapters); use adapter.sync=merged"
        )
    if not rollout.enable_lora or rollout.max_lora_rank < adapter.rank:
        raise ConfigError(
            f"adapter.sync=adapter serves the rank-{adapter.rank} adapter through vLLM LoRA "
            f"requests: set rollout.enable_lora=true and rollout.max_lora_rank >= {adapter.rank} "
            f"(one of vLLM's 8, 16, 32, 64, ...; now enable_lora={rollout.enable_lora}, "
            f"max_lora_rank={rollout.max_lora_rank})"
        )


def check_guard_precision(adapter: AdapterConfig, model) -> None:
    """The full fine-tuning guard writes W - R(dW) back in the stored dtype: in bf16 a principal
    update below half a bf16 step rounds back in (a 512x512 emulation kept 0.023 of its principal
    share, 3e-7 in fp32). Adapters are fine: PEFT keeps their factors in fp32."""
    if adapter.principal_guard and not adapter.enabled and model.dtype != "float32":
        raise ConfigError(
            f"adapter.principal_guard={adapter.principal_guard} with full fine-tuning needs fp32 "
            f"weights (bf16 rounds the removed principal update back in): set model.dtype=float32 "
            f"(bf16_autocast still computes in bf16), or train an adapter; got "
            f"model.dtype={model.dtype}"
        )
