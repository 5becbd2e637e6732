"""Config of the policy-gradient loop (recipes/pg.py): the learner's knobs and the run around them."""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar, Literal

from rlx.config.adapter import AdapterConfig, check_adapter_sync, check_guard_precision
from rlx.config.choices import (
    GROUP_ESTIMATORS,
    AdvantageEstimator,
    ImportanceLevel,
    LossAggregation,
    RewardNormalization,
    RewardScale,
    TisMode,
    WeightingMethod,
)
from rlx.config.common import OptimConfig, RunConfig
from rlx.config.core import AUTO_DTYPE, ConfigError, knob, require


@dataclasses.dataclass
class AlgoConfig:
    """Which member of the policy-gradient family: advantage estimator, clipping, loss reduction."""

    # the dynamic weighting's knobs have their own section (WeightingConfig)
    RENAMED: ClassVar[dict[str, str]] = {
        "reward_weighting": "weighting.method",
        "advantage": "algo.learner",
        **{
            name: f"weighting.{name}"
            for name in ("hv_every", "hv_prompts", "hv_minimise", "hv_validation")
            + ("hv_adapt_weights", "hv_adapt_lr", "grad_lambda", "grad_layers")
        },
    }

    learner: AdvantageEstimator = knob(
        "grpo",
        help="the policy-gradient learner, named by its advantage estimator: grpo, dr_grpo, rloo, "
        "reinforce, reinforce_baseline (rlx/algos/pg.py)",
    )
    loss_aggregation: LossAggregation = knob(
        "token_mean",
        help="sequence_mean (GRPO), token_mean (DAPO), constant_length (Dr. GRPO)",
    )
    importance_level: ImportanceLevel = knob(
        "token", help="token ratios (GRPO/DAPO) or one sequence ratio (GSPO)"
    )
    eps_low: float = knob(0.2, help="lower clip: ratio >= 1 - eps_low")
    eps_high: float = knob(0.28, help="upper clip: ratio <= 1 + eps_high (DAPO clip-higher)")
    kl_beta: float = knob(0.0, help="weight of the k3 KL to the reference model; 0 = no reference")
    tis_cap: float = knob(
        2.0,
        help="importance-sampling correction of the vLLM/trainer mismatch: upper bound of the "
        "ratio trainer/sampler; 0 = no correction",
    )
    tis_mode: TisMode = knob(
        "token_truncate",
        help="per token or per sequence (product of the token ratios); truncate = clamp the ratio "
        "to [tis_min, tis_cap], mask = weight 0 outside it (TRL's vllm_importance_sampling_mode)",
    )
    tis_min: float = knob(
        0.0, help="lower bound of the importance ratio (the mask modes drop tokens/sequences below)"
    )
    ppo_epochs: int = knob(
        1,
        help="passes over each rollout batch (TRL's num_iterations); the old logprobs are taken "
        "once before the first; > 1 lets eps_low / eps_high act",
    )
    mini_batches: int = knob(
        1,
        help="optimizer steps per pass: the batch's kept groups are dealt round-robin into this "
        "many mini-batches",
    )
    dynamic_sampling: bool = knob(True, help="drop groups whose rewards are all equal")
    reward_normalization: RewardNormalization = knob(
        "sum_then_normalize",
        help="weighted sum of rewards then advantages, or (learner=grpo) advantages per reward, "
        "weighted sum, re-normalised over the batch (GDPO; a None reward adds 0)",
    )
    scale_rewards: RewardScale = knob(
        "group",
        help="learner=grpo divides by the group's reward std, or by the whole batch's",
    )
    mask_truncated_completions: bool = knob(
        False, help="completions cut at rollout.max_new_tokens get no loss (DAPO's overlong filter)"
    )

    def __post_init__(self) -> None:
        require(0 <= self.eps_low < 1, "eps_low", "in [0, 1)", self.eps_low)
        require(self.eps_high >= 0, "eps_high", ">= 0", self.eps_high)
        require(self.kl_beta >= 0, "kl_beta", ">= 0", self.kl_beta)
        require(self.tis_cap == 0 or self.tis_cap >= 1, "tis_cap", "0 (off) or >= 1", self.tis_cap)
        require(0 <= self.tis_min < 1, "tis_min", "in [0, 1)", self.tis_min)
        require(self.ppo_epochs >= 1, "ppo_epochs", ">= 1", self.ppo_epochs)
        require(self.mini_batches >= 1, "mini_batches", ">= 1", self.mini_batches)
        if self.scale_rewards == "batch" and self.learner != "grpo":
            require(False, "scale_rewards", "'group' unless learner=grpo", self.scale_rewards)
        if self.reward_normalization == "normalize_then_sum" and self.learner != "grpo":
            rule = "sum_then_normalize unless learner=grpo"
            require(False, "reward_normalization", rule, self.reward_normalization)


@dataclasses.dataclass
class WeightingConfig:
    """How the rewards' weights move during training (rlx/weighting.py, docs/multi_objective.md):
    hv_* are the hypervolume-guided method's knobs, grad_* the gradient-based method's."""

    method: WeightingMethod = knob(
        "static",
        help="static: the rewards' weights; hypervolume: also scale each step's learning rate "
        "by a meta-reward from the hypervolume gain of a validation point (2 or 3 rewards); "
        "gradient: weights moved by the influence of each reward's policy gradient "
        "(docs/multi_objective.md)",
    )
    hv_every: int = knob(1, help="hypervolume: evaluate the validation slice every k steps")
    hv_prompts: int = knob(16, help="hypervolume: held-out prompts in the validation slice")
    hv_minimise: list[str] = knob(
        [], help="hypervolume: names of the validation objectives whose mean is minimised"
    )
    hv_validation: dict[str, str] = knob(
        {},
        help="hypervolume: reward name -> 'file.py:function' scored in its place on the "
        "validation slice, e.g. {concise: rewards/multi_objective.py:completion_length}",
    )
    hv_adapt_weights: bool = knob(
        False,
        help="hypervolume: also move the preference weights after each validation, toward the "
        "objectives whose gain grows the hypervolume most (false: fixed, as the reference)",
    )
    hv_adapt_lr: float = knob(1.0, help="hypervolume: step size of the adaptive weights (> 0)")
    grad_lambda: float = knob(
        1e-5,
        help="gradient: the regulariser lambda of the mirror-descent step "
        "w <- softmax(log w + lr * I / lambda), lr = the policy's current learning rate; the "
        "reference's lr / lambda is 1e-6 / 1e-5 = 0.1",
    )
    grad_accumulation_steps: int = knob(
        1,
        help="gradient: the weights move every k steps, by the mean influence over those steps "
        "(the reference's weight_accumulation_steps; 1 = every step)",
    )
    grad_self_term: bool = knob(
        True,
        help="gradient: I_k = <g_k, sum_j g_j> includes j = k (the reference); false drops "
        "<g_k, g_k>, which with few samples is mostly noise and favours the noisiest objective",
    )
    grad_layers: list[int] = knob(
        [],
        help="gradient: decoder layers whose parameters' gradients enter the influences; "
        "[] = the middle half (the reference used layers 10-25 of 36)",
    )

    def __post_init__(self) -> None:
        require(self.hv_every >= 1, "hv_every", ">= 1", self.hv_every)
        require(self.hv_prompts >= 1, "hv_prompts", ">= 1", self.hv_prompts)
        ok = math.isfinite(self.hv_adapt_lr) and self.hv_adapt_lr > 0
        require(ok, "hv_adapt_lr", "a finite number > 0", self.hv_adapt_lr)
        ok = math.isfinite(self.grad_lambda) and self.grad_lambda > 0
        require(ok, "grad_lambda", "a finite number > 0", self.grad_lambda)
        steps = self.grad_accumulation_steps
        require(steps >= 1, "grad_accumulation_steps", ">= 1", steps)
        layers = self.grad_layers
        ok = all(i >= 0 for i in layers) and len(set(layers)) == len(layers)
        require(ok, "grad_layers", "distinct layer indices >= 0", layers)


@dataclasses.dataclass
class PGConfig(RunConfig):
    """recipes/pg.py: GRPO / RLOO / REINFORCE on rollouts from the rlx rollout engine."""

    # the old LoRA-only section: adapter.method=lora is what lora.enabled=true trained
    RENAMED: ClassVar[dict[str, str]] = {
        "lora": "adapter.method=lora with adapter.rank, adapter.alpha, adapter.target_modules "
        "(lora.enabled=false: adapter.method=none, the default)"
    }

    algo: AlgoConfig = knob(AlgoConfig(), help="the learner")
    optim: OptimConfig = knob(OptimConfig(), help="optimizer")
    adapter: AdapterConfig = knob(
        AdapterConfig(), help="full fine-tuning or an adapter, the principal guard, diagnostics"
    )
    weighting: WeightingConfig = knob(
        WeightingConfig(), help="static reward weights, or weights moved during training"
    )
    micro_batch_size: int = knob(
        16, help="sequences per forward/backward pass (rounded down to whole groups, at least one)"
    )
    sync_every: int = knob(1, help="push weights to the rollout engine every k steps")
    bf16_autocast: bool | Literal["auto"] = knob(
        "auto",
        help=f"bf16 autocast for the trainer forward/backward (on = bfloat16); {AUTO_DTYPE}",
    )
    output_dir: str = knob("runs/pg", help="metrics, checkpoints, eval.json, plots")

    def __post_init__(self) -> None:
        super().__post_init__()
        check_adapter_sync(self.adapter, self.rollout)
        check_guard_precision(self.adapter, self.model)
        require(self.micro_batch_size >= 1, "micro_batch_size", ">= 1", self.micro_batch_size)
        require(self.sync_every >= 1, "sync_every", ">= 1", self.sync_every)
        r = self.rollout
        if r.top_p < 1 or r.top_k != -1:
            # The trainer's logprobs apply the temperature only; the sampler's are renormalised
            # over the kept tokens, so the importance weights and the logprob gap would be biased.
            raise ConfigError(
                f"rollout.top_p={r.top_p} / rollout.top_k={r.top_k}: training samples from the "
                "full distribution (the trainer's logprobs are not truncated like the sampler's); "
                "set rollout.top_p=1.0 and rollout.top_k=-1, and use rollout.temperature"
            )
        if self.algo.learner in GROUP_ESTIMATORS and self.rollout.num_samples < 2:
            rule = f">= 2 for algo.learner={self.algo.learner} (or use reinforce)"
            require(False, "rollout.num_samples", rule, self.rollout.num_samples)
