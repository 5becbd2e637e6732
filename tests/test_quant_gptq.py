"""GPTQ rounding (rlx/quant/gptq.py): equal to round-to-nearest when the inputs are uncorrelated,
a smaller output error than round-to-nearest when they are correlated, and clear shape errors."""

from __future__ import annotations

import pytest
import torch

from rlx.quant.gptq import gptq_quantize, hessian
from rlx.quant.quantizer import quantize_weight


def output_error(w: torch.Tensor, w_hat: torch.Tensor, h: torch.Tensor) -> float:
    """Mean squared output error tr(D H D^T) / rows of the weight change D = w_hat - w."""
    d = (w_hat - w).double()
    return float(torch.einsum("oi,ij,oj->", d, h.double(), d)) / w.shape[0]


@pytest.mark.parametrize("bits", [3, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_uncorrelated_inputs_give_round_to_nearest(bits, dtype):
    """With a diagonal Hessian no error is passed on, so GPTQ is exactly round-to-nearest."""
    w = torch.randn(16, 128, generator=torch.Generator().manual_seed(0))
    h = torch.diag(torch.rand(128, generator=torch.Generator().manual_seed(1)) + 0.5)
    got, ref = gptq_quantize(w, h, bits, 64, dtype), quantize_weight(w, bits, 64, dtype)
    assert torch.equal(got.codes, ref.codes) and torch.equal(got.zero, ref.zero)
    assert torch.equal(got.scale, ref.scale) and got.scale.dtype == dtype


@pytest.mark.parametrize("bits", [3, 4])
def test_correlated_inputs_smaller_output_error_than_nearest(bits):
    gen = torch.Generator().manual_seed(2)
    mix = torch.randn(128, 128, generator=gen) / 128**0.5
    x = torch.randn(2048, 128, generator=gen) @ (torch.eye(128) + 2 * mix)  # correlated channels
    w = torch.randn(32, 128, generator=gen)
    h = hessian(x)
    got = gptq_quantize(w, h, bits, 64, torch.float32)
    nearest = quantize_weight(w, bits, 64, torch.float32)
    assert got.codes.min() >= 0 and got.codes.max() <= 2**bits - 1
    assert got.scale.shape == got.zero.shape == (32, 2)
    err_gptq = output_error(w, got.dequantize(), h)
    err_nearest = output_error(w, nearest.dequantize(), h)
    assert err_gptq < 0.8 * err_nearest, (err_gptq, err_nearest)


def test_dead_channels_and_shape_errors():
    w = torch.randn(4, 64)
    x = torch.randn(256, 64)
    x[:, 5] = 0  # an input channel never active on the calibration data
    got = gptq_quantize(w, hessian(x), 4, 32)
    assert torch.isfinite(got.dequantize()).all()
    assert float(got.dequantize()[:, 5].abs().max()) == 0.0  # its weights do not matter: zero
    with pytest.raises(ValueError, match="does not divide"):
        gptq_quantize(w, hessian(x), 4, 48)
    with pytest.raises(ValueError, match="does not fit"):
        gptq_quantize(w, torch.eye(32), 4, 32)
