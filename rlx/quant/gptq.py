"""GPTQ rounding: quantise a weight column by column, pushing each column's rounding error onto the
columns not yet quantised, weighted by the inverse Hessian of the layer's output error.

For a linear with input activations X [T, in], the output error of a weight change D is
tr(D H D^T) with H = X^T X / T. GPTQ (Frantar et al. 2022) quantises input channel j of every row,
then updates the remaining channels by -err_j * Hinv[j, j+1:] / Hinv[j, j], where Hinv is the upper
Cholesky factor of H^-1 (dampened by `damp` x mean(diag H)). Blocks of `group_size` columns are
done at once (the lazy batch update), so the result is a `QuantizedWeight` like `quantize_weight`'s,
and it replaces round-to-nearest after AWQ/QuantLRM's scale search (`QuantizeConfig.rounding`).

Column order and group ranges:
- in natural order, a group's scale and zero point are taken from its columns as they stand when
  the group starts (after the updates from earlier groups);
- with `act_order`, columns go in order of decreasing H[j, j] (the channels with the most input
  energy first, while the most columns are left to absorb their error), and every group's scale
  and zero point are fixed beforehand from the weights as given ("static groups", as AutoGPTQ
  calls them). The groups stay the consecutive channels the export stores, so the checkpoint
  layout is the same either way. On the main job's model at W4 it lowered the token KL to the
  fine-tuned model from 0.0276 to 0.0161 (bench/quant_kl.py, README "Quantize").
Written from the paper's algorithm; checked against round-to-nearest in tests/quant/test_quant_gptq.py.
"""

from __future__ import annotations

import torch

from rlx.quant.quantizer import (
    QuantizedWeight,
    stored_group_scale_zero,
    stored_scale_zero,
    zero_inclusive_range,
)


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
    act_order: bool = False,
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
    qmax = 2**bits - 1
    groups = in_features // group_size
    if act_order:  # static groups: every range from the weights before any error is pushed on
        scales, zeros = stored_group_scale_zero(w.t(), bits, group_size, dtype)  # as RTN's
        order = torch.argsort(h.diagonal(), descending=True, stable=True)
        w, h = w[order], h[order][:, order]
    else:
        scales = torch.empty(out_features, groups, dtype=dtype, device=w.device)
        zeros = torch.empty(out_features, groups, device=w.device)
        order = torch.arange(in_features, device=w.device)
    hinv = _inverse_cholesky(h, damp)
    group_of = order // group_size  # the group of each column, in processing order
    codes = torch.empty(in_features, out_features, device=w.device)
    for a in range(0, in_features, group_size):
        b = a + group_size
        block, hb = w[a:b], hinv[a:b, a:b]  # [g, O] (a view: updated in place), [g, g]
        if not act_order:  # this block is group a // group_size: its range as it stands now
            scales[:, a // group_size], zeros[:, a // group_size] = stored_scale_zero(
                *zero_inclusive_range(block, 0), bits, dtype
            )
        s = scales[:, group_of[a:b]].float().t()  # [g, O]: each column's scale and zero point
        z = zeros[:, group_of[a:b]].t()
        errors = torch.empty_like(block)
        inv_diag = 1.0 / hb.diagonal()
        for j in range(group_size):
            col = block[j]
            q = torch.round(col / s[j]).add_(z[j]).clamp_(0, qmax)
            err = (col - (q - z[j]) * s[j]).mul_(inv_diag[j])
            block[j:].addr_(hb[j, j:], err, alpha=-1.0)  # this column becomes (q - z) * s
            errors[j] = err
            codes[order[a + j]] = q
        w[b:].addmm_(hinv[a:b, b:].t(), errors, alpha=-1.0)  # the block's error, pushed on
    return QuantizedWeight(
        codes.t().to(torch.int16).contiguous(), scales, zeros.to(torch.int16), bits, group_size
    )


def gptq_quantize_shared(
    weights: list[torch.Tensor],
    h: torch.Tensor,
    bits: int,
    group_size: int,
    dtype: torch.dtype = torch.bfloat16,
    damp: float = 0.01,
    act_order: bool = False,
) -> list[QuantizedWeight]:
    """GPTQ for linears that read the same input (q/k/v, gate/up): rows are quantised
    independently under the same Hessian, so one pass over the stacked rows gives each weight's
    result at a fraction of the Python loop's cost."""
    stacked = gptq_quantize(
        torch.cat([w.detach() for w in weights]), h, bits, group_size, dtype, damp, act_order
    )
    results, start = [], 0
    for w in weights:
        rows = slice(start, start + w.shape[0])
        results.append(
            QuantizedWeight(
                stacked.codes[rows].clone(),
                stacked.scale[rows].clone(),
                stacked.zero[rows].clone(),
                bits,
                group_size,
            )
        )
        start = rows.stop
    return results
