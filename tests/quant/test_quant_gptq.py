"""GPTQ rounding (rlx/quant/gptq.py): equal to round-to-nearest when the inputs are uncorrelated,
a smaller output error than round-to-nearest when they are correlated (in natural and in
activation order), static group ranges in activation order, and clear shape errors."""

from __future__ import annotations

import pytest
import torch

from rlx.quant.gptq import gptq_quantize, hessian
from rlx.quant.quantizer import quantize_weight


def output_error(w: torch.Tensor, w_hat: torch.Tensor, h: torch.Tensor) -> float:
    """Mean squared output error tr(D H D^T) / rows of the weight change D = w_hat - w."""
    d = (w_hat - w).double()
    return float(torch.einsum("oi,ij,oj->", d, h.double(), d)) / w.shape[0]


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("bits", [3, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_uncorrelated_inputs_give_round_to_nearest(bits, dtype, act_order):
    """With a diagonal Hessian no error is passed on, so GPTQ is exactly round-to-nearest (in
    either column order)."""
    w = torch.randn(16, 128, generator=torch.Generator().manual_seed(0))
    h = torch.diag(torch.rand(128, generator=torch.Generator().manual_seed(1)) + 0.5)
    got = gptq_quantize(w, h, bits, 64, dtype, act_order=act_order)
    ref = quantize_weight(w, bits, 64, dtype)
    assert torch.equal(got.codes, ref.codes) and torch.equal(got.zero, ref.zero)
    assert torch.equal(got.scale, ref.scale) and got.scale.dtype == dtype


def correlated(seed: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """A weight [32, 128] and the Hessian of correlated inputs of unequal energy."""
    gen = torch.Generator().manual_seed(seed)
    mix = torch.randn(128, 128, generator=gen) / 128**0.5
    energy = torch.rand(128, generator=gen) * 3 + 0.1
    x = torch.randn(2048, 128, generator=gen) @ (torch.eye(128) + 2 * mix) * energy
    return torch.randn(32, 128, generator=gen), hessian(x)


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("bits", [3, 4])
def test_correlated_inputs_smaller_output_error_than_nearest(bits, act_order):
    w, h = correlated()
    got = gptq_quantize(w, h, bits, 64, torch.float32, act_order=act_order)
    nearest = quantize_weight(w, bits, 64, torch.float32)
    assert got.codes.min() >= 0 and got.codes.max() <= 2**bits - 1
    assert got.scale.shape == got.zero.shape == (32, 2)
    err_gptq = output_error(w, got.dequantize(), h)
    err_nearest = output_error(w, nearest.dequantize(), h)
    assert err_gptq < 0.8 * err_nearest, (err_gptq, err_nearest)


def test_act_order_uses_static_groups_of_consecutive_channels():
    """In activation order every group keeps the consecutive channels the export stores, with the
    range of the weights as given (so quantize_weight's scales and zero points), and the codes
    are GPTQ's: different from nearest rounding and a smaller output error than natural order
    on inputs whose energy differs across channels."""
    w, h = correlated(seed=3)
    got = gptq_quantize(w, h, 4, 64, torch.bfloat16, act_order=True)
    nearest = quantize_weight(w, 4, 64, torch.bfloat16)
    assert torch.equal(got.scale, nearest.scale) and torch.equal(got.zero, nearest.zero)
    assert not torch.equal(got.codes, nearest.codes)
    natural = gptq_quantize(w, h, 4, 64, torch.bfloat16)
    err_act = output_error(w, got.dequantize(), h)
    assert err_act < output_error(w, natural.dequantize(), h), err_act


def test_dead_channels_and_shape_errors():
    w = torch.randn(4, 64)
    x = torch.randn(256, 64)
    x[:, 5] = 0  # an input channel never active on the calibration data
    for act_order in (False, True):
        got = gptq_quantize(w, hessian(x), 4, 32, act_order=act_order)
        assert torch.isfinite(got.dequantize()).all()
        assert float(got.dequantize()[:, 5].abs().max()) == 0.0  # its weights do not matter
    with pytest.raises(ValueError, match="does not divide"):
        gptq_quantize(w, hessian(x), 4, 48)
    with pytest.raises(ValueError, match="does not fit"):
        gptq_quantize(w, torch.eye(32), 4, 32)
