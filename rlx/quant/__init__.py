"""Quantize-and-export: QuantLRM (fine-tuning dW as channel importance), AWQ and RTN baselines.

    rlx quantize --base smollm2 --finetuned runs/rl/final --method quantlrm --bits 4 \
        --group-size 128 --calib arithmetic --out runs/q4
    rlx eval --model runs/rl/final --model runs/q4 --task arithmetic

Modules: importance.py (QuantLRM and AWQ channel importance), quantizer.py (asymmetric group
quantisation), scale_search.py (AWQ scale + clip search per layer), gptq.py (GPTQ rounding),
pseudo_finetune.py (dW for a model with no "before" checkpoint), tune.py (optional tuning of the
stored scales), calibration.py, export.py (compressed-tensors pack-quantized), checks.py (bad
input and vLLM kernel limits), pipeline.py (the whole run); the configs are in rlx/config/quant.py.
"""

from rlx.config import (
    CalibrationConfig,
    EvalCommandConfig,
    PseudoFinetuneConfig,
    QuantizeConfig,
    TuneConfig,
)
from rlx.quant.checks import QuantError
from rlx.quant.importance import (
    DeltaStats,
    activation_importance,
    channel_importance,
    delta_stats,
    restricted_quadratic,
)
from rlx.quant.pipeline import QuantResult, plan_quantization, quantize_model
from rlx.quant.quantizer import QuantizedWeight, fake_quantize, quantize_weight

__all__ = [
    "CalibrationConfig",
    "DeltaStats",
    "EvalCommandConfig",
    "PseudoFinetuneConfig",
    "QuantError",
    "QuantResult",
    "QuantizeConfig",
    "QuantizedWeight",
    "TuneConfig",
    "activation_importance",
    "channel_importance",
    "delta_stats",
    "fake_quantize",
    "plan_quantization",
    "quantize_model",
    "quantize_weight",
    "restricted_quadratic",
]
