"""Channel importance: QuantLRM's fine-tuning signal and AWQ's activation statistic.

QuantLRM ("Quantization of Large Reasoning Models via Fine-Tuning Signals", 2026), as specified in
the paper and its reference code (psunlpgroup/QuantLRM):
1. |dW| = |W_after - W_before| for q, k, v, o, gate, up, down of every layer.
2. Over the nonzero entries of all those matrices together: global min x_min, exact median x_mid
   (mean of the two middle values for an even count) and max x_max.
3. Restricted quadratic with R = 10, "protect both ends": y = 1 where dW == 0;
   y = 1 + (R-1)((x_mid - x)/(x_mid - x_min))^2 for 0 < x <= x_mid;
   y = 1 + (R-1)((x - x_mid)/(x_max - x_mid))^2 for x > x_mid.
4. Importance of input channel j: mean_i y_ij * (number of zero updates in column j + 1); the q
   matrix's importance serves q, k and v, the gate matrix's serves gate and up.

Choices where the paper leaves room: dW is compared at the precision the fine-tuned checkpoint is
stored in (`delta_dtype` auto), so "zero update" means the stored weight did not change, as for the
paper's bf16 checkpoints. Forcing bf16 on float32 checkpoints hurts: on the bench's float32
fine-tune, 66% of the updates became zeros and |dW| was dominated by bf16 rounding flips of large
weights (an ulp of |w|), and QuantLRM W4 fell from 0.572 to 0.433 held-out reward. A zero
denominator (x_mid == x_min or x_max == x_mid) makes that branch 1.

AWQ (llm-awq): importance of input channel j = mean over calibration tokens of |x_j|.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import torch

from rlx.adapters.diff import weight_delta

RADIUS = 10.0
"""R of the restricted quadratic: importance lies in [1, R] before the zero-count factor."""


@dataclass(frozen=True)
class DeltaStats:
    """Global statistics of the nonzero |dW| entries over every quantised matrix."""

    x_min: float
    x_mid: float
    x_max: float
    nonzero: int
    zeros: int


def abs_delta(before: torch.Tensor, after: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """|W_after - W_before| [O, I] in float32, both weights first rounded to `dtype` (the one
    weight diff of rlx: rlx.adapters.diff.weight_delta)."""
    return weight_delta(before, after, dtype).abs()


def delta_stats(abs_deltas: Iterable[torch.Tensor]) -> DeltaStats:
    """Min, exact median and max over all nonzero entries of all the given |dW| matrices."""
    values, zeros = [], 0
    for d in abs_deltas:
        flat = d.reshape(-1)
        nz = flat[flat > 0]
        zeros += flat.numel() - nz.numel()
        values.append(nz.cpu().numpy().astype(np.float32, copy=False))
    allv = np.concatenate(values) if values else np.zeros(0, np.float32)
    n = allv.size
    if n == 0:
        raise ValueError("every dW entry is zero: the two models are identical")
    mid = [n // 2] if n % 2 else [n // 2 - 1, n // 2]
    allv.partition(mid)
    x_mid = float(np.mean(allv[mid], dtype=np.float64))
    return DeltaStats(float(allv.min()), x_mid, float(allv.max()), n, zeros)


def restricted_quadratic(
    x: torch.Tensor, stats: DeltaStats, radius: float = RADIUS
) -> torch.Tensor:
    """QuantLRM's map of |dW| entries to [1, R]: zeros -> 1, both ends -> R, the median -> 1."""
    x = x.float()
    left_den, right_den = stats.x_mid - stats.x_min, stats.x_max - stats.x_mid
    left = (stats.x_mid - x) / left_den if left_den > 0 else torch.zeros_like(x)
    right = (x - stats.x_mid) / right_den if right_den > 0 else torch.zeros_like(x)
    z = torch.where(x <= stats.x_mid, left, right).clamp(-1, 1)  # [O, I]
    y = 1 + (radius - 1) * z * z
    return torch.where(x == 0, torch.ones_like(y), y)


def channel_importance(
    abs_dw: torch.Tensor, stats: DeltaStats, radius: float = RADIUS
) -> torch.Tensor:
    """Importance [I] of each input channel: mean_i y_ij * (zero updates in column j + 1)."""
    y = restricted_quadratic(abs_dw, stats, radius)  # [O, I]
    zero_count = (abs_dw == 0).sum(0)  # [I]
    return y.mean(0) * (zero_count + 1).float()


def activation_importance(x: torch.Tensor) -> torch.Tensor:
    """AWQ's importance [C]: mean |x| of each channel over all calibration tokens."""
    return x.abs().reshape(-1, x.shape[-1]).float().mean(0)


def quantlrm_importances(
    before: dict[str, torch.Tensor],
    after: dict[str, torch.Tensor],
    layer_names: list[list[str]],
    sources: list[str],
    delta_dtype: torch.dtype = torch.bfloat16,
    radius: float = RADIUS,
) -> tuple[list[dict[str, torch.Tensor]], DeltaStats]:
    """QuantLRM importance for every layer.

    `before` / `after` map full parameter names to weights; `layer_names[l]` lists the full names
    of layer l's quantised weights (they all enter the global statistics); `sources` are the
    suffixes whose importance is wanted (e.g. "self_attn.q_proj.weight"). Returns, per layer,
    {source suffix: importance [in_features]} and the global statistics.
    """
    every = [n for names in layer_names for n in names]
    stats = delta_stats(abs_delta(before[n], after[n], delta_dtype) for n in every)
    out = []
    for names in layer_names:
        per_layer = {}
        for suffix in sources:
            (name,) = [n for n in names if n.endswith(suffix)]
            dw = abs_delta(before[name], after[name], delta_dtype)
            per_layer[suffix] = channel_importance(dw, stats, radius)
        out.append(per_layer)
    return out, stats
