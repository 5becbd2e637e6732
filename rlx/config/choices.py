"""Every named choice of the configs, written once.

Each choice is a Literal type, what the config fields are annotated with (`load_config` rejects any
other name, listing these), and where code outside the configs needs the names (a registry, an
argument check) a tuple of them derived from it. Code below the configs (rlx/algos, rlx/es, ...)
imports the tuples from here, never the other way round; the name -> function registries
(ADVANTAGES, SHAPERS, the adapters' METHODS) are checked against them by
tests/config/test_choices.py.
"""

from __future__ import annotations

from typing import Literal, get_args

# ----------------------------------------------------------------------------- policy gradient (pg.py)

AdvantageEstimator = Literal["grpo", "dr_grpo", "rloo", "reinforce", "reinforce_baseline"]
ADVANTAGE_ESTIMATORS: tuple[str, ...] = get_args(AdvantageEstimator)
"""rlx/algos/pg.py ADVANTAGES."""

GROUP_ESTIMATORS: tuple[str, ...] = ("grpo", "dr_grpo", "rloo", "reinforce_baseline")
"""The advantage estimators that compare a sample with the others of its group (need G >= 2)."""

LossAggregation = Literal["sequence_mean", "token_mean", "constant_length"]
LOSS_AGGREGATIONS: tuple[str, ...] = get_args(LossAggregation)

ImportanceLevel = Literal["token", "sequence"]
IMPORTANCE_LEVELS: tuple[str, ...] = get_args(ImportanceLevel)

TisMode = Literal["token_truncate", "token_mask", "sequence_truncate", "sequence_mask"]
TIS_MODES: tuple[str, ...] = get_args(TisMode)
"""TRL's vllm_importance_sampling_mode: one ratio per token or per sequence, truncated or masked."""

RewardNormalization = Literal["sum_then_normalize", "normalize_then_sum"]
REWARD_NORMALIZATIONS: tuple[str, ...] = get_args(RewardNormalization)

RewardScale = Literal["group", "batch"]
REWARD_SCALES: tuple[str, ...] = get_args(RewardScale)
"""TRL's scale_rewards: divide by the std of the group or of the whole batch (GRPO only)."""

WeightingMethod = Literal["static", "hypervolume", "gradient"]
WEIGHTING_METHODS: tuple[str, ...] = get_args(WeightingMethod)
"""rlx/weighting.py: fixed reward weights, or one of the two dynamic weightings."""

# ----------------------------------------------------------------------------- adapters (adapter.py)

AdapterMethod = Literal["none", "lora", "dora", "pissa", "minor", "mica", "miss", "adalora"]
ADAPTER_METHODS: tuple[str, ...] = get_args(AdapterMethod)
"""none = full fine-tuning; the rest are rlx/adapters/methods.py METHODS."""

AdapterSync = Literal["merged", "adapter"]

# ----------------------------------------------------------------------------- rollout (common.py)

RolloutBackend = Literal["vllm", "hf", "server"]
ROLLOUT_BACKENDS: tuple[str, ...] = get_args(RolloutBackend)
"""rlx/rollout make_engine."""

SyncBackend = Literal["auto", "nccl", "gloo"]
SYNC_BACKENDS: tuple[str, ...] = get_args(SyncBackend)
"""The weight-sync transport to rollout servers (rlx/rollout/weight_transfer.py)."""

# ----------------------------------------------------------------------------- ES (es.py)

ESEvaluator = Literal["hf_batched", "vllm_lora", "inplace"]
ES_EVALUATORS: tuple[str, ...] = get_args(ESEvaluator)
"""rlx/es/population.py make_evaluator."""

NoiseKind = Literal["low_rank", "full_rank"]
NOISE_KINDS: tuple[str, ...] = get_args(NoiseKind)

FitnessShaping = Literal["zscore", "group_zscore", "pair_sign", "none"]
FITNESS_SHAPINGS: tuple[str, ...] = get_args(FitnessShaping)
"""rlx/algos/eggroll.py SHAPERS."""

PromptAssignment = Literal["all", "grouped"]
PROMPT_ASSIGNMENTS: tuple[str, ...] = get_args(PromptAssignment)

ESOptimizer = Literal["sgd", "adam"]

# ----------------------------------------------------------------------------- quantisation (quant.py)

QuantMethod = Literal["quantlrm", "awq", "rtn"]
QUANT_METHODS: tuple[str, ...] = get_args(QuantMethod)

Rounding = Literal["nearest", "gptq"]
ROUNDINGS: tuple[str, ...] = get_args(Rounding)

ExportFormat = Literal["auto", "pack-quantized", "dequantized"]

Int4Serving = Literal["auto", "vllm", "dequantize"]

# ----------------------------------------------------------------------------- shared

Dtype = Literal["float32", "bfloat16"]
AutoDtype = Literal["auto", "float32", "bfloat16"]
"""A dtype knob that also takes auto (core.AUTO_DTYPE says what it means)."""

LrSchedule = Literal["constant", "linear", "cosine"]

OnError = Literal["error", "skip"]
