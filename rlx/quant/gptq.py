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

from rlx.quant.quantizer import QuantizedWeight, stored_scale_zero


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
    w = w.detach().float().t().contiguous()  # [in, out]: a column of W is a contiguous row here
    h = h.float().clone()
    dead = h.diagonal() == 0  # channels never active on the calibration data
    h[dead, dead] = 1.0
    w[dead] = 0.0
    hinv = _inverse_cholesky(h, damp)
    qmax = 2**bits - 1
    groups = in_features // group_size
    codes = torch.empty(in_features, out_features)
    scales = torch.empty(out_features, groups, dtype=dtype)
    zeros = torch.empty(out_features, groups, dtype=torch.int16)
    for g in range(groups):
        a, b = g * group_size, (g + 1) * group_size
        block, hb = w[a:b], hinv[a:b, a:b]  # [g, O] (a view: updated in place), [g, g]
        lo, hi = block.amin(0).clamp(max=0), block.amax(0).clamp(min=0)  # the range holds 0
        scale, z = stored_scale_zero(lo, hi, bits, dtype)  # as quantize_weight
        s = scale.float()
        errors = torch.empty_like(block)
        inv_diag = 1.0 / hb.diagonal()
        for j in range(group_size):
            col = block[j]
            q = torch.round(col / s).add_(z).clamp_(0, qmax)
            err = (col - (q - z) * s).mul_(inv_diag[j])
            block[j:].addr_(hb[j, j:], err, alpha=-1.0)  # this column becomes (q - z) * s
            errors[j] = err
            codes[a + j] = q
        w[b:].addmm_(hinv[a:b, b:].t(), errors, alpha=-1.0)  # the group's error, pushed on
        scales[:, g], zeros[:, g] = scale, z.to(torch.int16)
    return QuantizedWeight(codes.t().to(torch.int16).contiguous(), scales, zeros, bits, group_size)


def gptq_quantize_shared(
    weights: list[torch.Tensor],
    h: torch.Tensor,
    bits: int,
    group_size: int,
    dtype: torch.dtype = torch.bfloat16,
    damp: float = 0.01,
) -> list[QuantizedWeight]:
    """GPTQ for linears that read the same input (q/k/v, gate/up): rows are quantised
    independently under the same Hessian, so one pass over the stacked rows gives each weight's
    result at a fraction of the Python loop's cost."""
    stacked = gptq_quantize(torch.cat([w.detach() for w in weights]), h, bits, group_size, dtype,
                            damp)  # fmt: skip
    results, start = [], 0
    for w in weights:
        rows = slice(start, start + w.shape[0])
        results.append(QuantizedWeight(stacked.codes[rows].clone(), stacked.scale[rows].clone(),
                                       stacked.zero[rows].clone(), bits, group_size))  # fmt: skip
        start = rows.stop
    return results
