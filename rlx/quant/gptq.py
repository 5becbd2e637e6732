"""GPTQ rounding: quantise a weight column by column, pushing each column's rounding error onto the
columns not yet quantised, weighted by the inverse Hessian of the layer's output error.

For a linear with input activations X [T, in], the output error of a weight change D is
tr(D H D^T) with H = X^T X / T. GPTQ (Frantar et al. 2022) quantises input channel j of every row,
then updates the remaining channels by -err_j * Hinv[j, j+1:] / Hinv[j, j], where Hinv is the upper
Cholesky factor of H^-1 (dampened by `damp` x mean(diag H)). Blocks of `group_size` columns are
done at once, and a group's scale and zero point are taken from its columns as they stand when the
group starts (after the updates from earlier groups), so the stored (codes, scale, zero) are exactly
what the export holds: the result is a `QuantizedWeight` like `quantize_weight`'s, and it replaces
round-to-nearest after AWQ/QuantLRM's scale and clip searches (`QuantizeConfig.rounding`).
Written from the paper's algorithm; checked against round-to-nearest in tests/test_quant_gptq.py.
"""

from __future__ import annotations

import torch

from rlx.quant.quantizer import QuantizedWeight


def hessian(x: torch.Tensor) -> torch.Tensor:
    """H = X^T X / T [in, in] in float32 from activations [..., in]."""
    flat = x.reshape(-1, x.shape[-1]).float()
    return flat.T @ flat / flat.shape[0]


def _inverse_cholesky(h: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor of (H + damp * mean(diag H) * I)^-1."""
    h = h.clone()
    h.diagonal().add_(damp * h.diagonal().mean().clamp(min=1e-8))
    inv = torch.cholesky_inverse(torch.linalg.cholesky(h))
    return torch.linalg.cholesky(inv, upper=True)


def gptq_quantize(
    w: torch.Tensor,
    h: torch.Tensor,
    bits: int,
    group_size: int,
    dtype: torch.dtype = torch.bfloat16,
    damp: float = 0.01,
) -> QuantizedWeight:
    """GPTQ-quantised `w` [out, in] given the input Hessian `h` [in, in] (see the module doc)."""
    out_features, in_features = w.shape
    if in_features % group_size:
        raise ValueError(f"group size {group_size} does not divide in_features {in_features}")
    if h.shape != (in_features, in_features):
        raise ValueError(f"Hessian {tuple(h.shape)} does not fit weight {tuple(w.shape)}")
    w = w.detach().float().clone()
    h = h.float().clone()
    dead = h.diagonal() == 0  # channels never active on the calibration data
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    hinv = _inverse_cholesky(h, damp)
    qmax = 2**bits - 1
    groups = in_features // group_size
    codes = torch.empty(out_features, in_features, dtype=torch.int16)
    scales = torch.empty(out_features, groups, dtype=dtype)
    zeros = torch.empty(out_features, groups, dtype=torch.int16)
    for g in range(groups):
        a, b = g * group_size, (g + 1) * group_size
        block = w[:, a:b].clone()  # [O, g]
        lo, hi = block.amin(1).clamp(max=0), block.amax(1).clamp(min=0)  # the range holds 0
        scale = ((hi - lo) / qmax).clamp(min=1e-5).to(dtype)  # as quantize_weight: stored dtype
        s = scale.float()
        z = torch.round(-lo / s).clamp(0, qmax)
        errors = torch.empty_like(block)
        hb = hinv[a:b, a:b]
        for j in range(group_size):
            col = block[:, j]
            q = torch.clamp(torch.round(col / s) + z, 0, qmax)
            err = (col - (q - z) * s) / hb[j, j]
            block[:, j:] -= err[:, None] * hb[j, j:][None, :]
            errors[:, j] = err
            codes[:, a + j] = q.to(torch.int16)
        w[:, b:] -= errors @ hinv[a:b, b:]  # the group's error, pushed onto the later columns
        scales[:, g], zeros[:, g] = scale, z.to(torch.int16)
    return QuantizedWeight(codes, scales, zeros, bits, group_size)
