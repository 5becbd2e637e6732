"""Asymmetric group quantisation of a weight matrix (weight-only, with zero point).

Each row of W [out, in] is cut into groups of `group_size` consecutive input channels. A group with
minimum m and maximum M (widened to include 0) gets scale s = (M - m) / (2^bits - 1) and zero
point z = round(-m / s);
its codes are q = clamp(round(w / s) + z, 0, 2^bits - 1) and it dequantises to (q - z) * s. This is
AWQ's (llm-awq) quantiser and, after the shift q - 2^(bits-1), compressed-tensors' signed int
layout, so what the search optimises is exactly what the export stores.

`quantize_weight` rounds the scale to the storage dtype before computing zero points and codes,
and `QuantizedWeight.dequantize` multiplies in float32, so the fake-quantised
model is bit-identical to what transformers decompresses from the export (in float32).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

MIN_SCALE = 1e-5
"""Floor on a group's scale (a constant group would otherwise divide by zero), as in llm-awq."""


def _grouped(w: torch.Tensor, group_size: int) -> torch.Tensor:
    out_features, in_features = w.shape
    if in_features % group_size:
        raise ValueError(f"group size {group_size} does not divide in_features {in_features}")
    return w.reshape(out_features, in_features // group_size, group_size)  # [O, G, g]


def clip_groups(w: torch.Tensor, group_size: int, max_val: torch.Tensor) -> torch.Tensor:
    """Clamp each group of `w` to [-max_val, max_val] (max_val [O, G], AWQ's clipping result)."""
    limit = max_val[..., None]  # [O, G, 1]
    return _grouped(w, group_size).clamp(-limit, limit).reshape(w.shape)


def zero_inclusive_range(x: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Min and max of `x` along `dim`, widened to hold 0.

    The range always holds 0 (as GPTQ / compressed-tensors observers do): a one-signed group would
    otherwise need a zero point outside [0, qmax] (llm-awq clamps it and breaks the group).
    """
    return x.amin(dim).clamp(max=0), x.amax(dim).clamp(min=0)  # amin + amax: 4x aminmax


def group_scale_zero(
    w: torch.Tensor, bits: int, group_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Float32 scale and zero point per (row, group), both [O, G] (zeros hold integers)."""
    lo, hi = zero_inclusive_range(_grouped(w.float(), group_size), -1)  # [O, G]
    qmax = 2**bits - 1
    scale = ((hi - lo) / qmax).clamp_(min=MIN_SCALE)  # [O, G]
    zero = (-lo / scale).round_().clamp_(0, qmax)  # [O, G]
    return scale, zero


def stored_scale_zero(
    lo: torch.Tensor, hi: torch.Tensor, bits: int, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale of a range [lo, hi] (which holds 0) rounded to the storage `dtype`, and the zero point
    computed from that rounded scale (float32, holding integers): what the export stores."""
    qmax = 2**bits - 1
    scale = ((hi - lo) / qmax).clamp(min=MIN_SCALE).to(dtype)
    zero = torch.round(-lo / scale.float()).clamp(0, qmax)
    return scale, zero


def stored_group_scale_zero(
    w: torch.Tensor, bits: int, group_size: int, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """`stored_scale_zero` of every (row, group) of `w` [O, I]: scale [O, G] in `dtype`, zero
    point [O, G] in float32."""
    return stored_scale_zero(
        *zero_inclusive_range(_grouped(w.float(), group_size), -1), bits, dtype
    )


def codes(
    w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int, group_size: int
) -> torch.Tensor:
    """Unsigned integer codes [O, I] (int16) of `w` under the given group scales and zeros."""
    q = _grouped(w.float(), group_size) / scale[..., None]  # [O, G, g]
    q.round_().add_(zero[..., None]).clamp_(0, 2**bits - 1)
    return q.reshape(w.shape).to(torch.int16)


def fake_quantize(w: torch.Tensor, bits: int, group_size: int) -> torch.Tensor:
    """Quantise and dequantise `w` in float32 (what the searches evaluate; in-place ops because
    the searches call this hundreds of times per layer)."""
    scale, zero = group_scale_zero(w, bits, group_size)
    scale, zero = scale[..., None], zero[..., None]  # [O, G, 1]
    q = _grouped(w.float(), group_size) / scale  # [O, G, g]
    # clamp(round(w/s) + z, 0, qmax) - z == clamp(round(w/s), -z, qmax - z): z is an integer
    q.round_().clamp_(-zero, 2**bits - 1 - zero).mul_(scale)
    return q.reshape(w.shape)


@dataclass
class QuantizedWeight:
    """One quantised linear weight, ready to pack or to dequantise."""

    codes: torch.Tensor  # [O, I] int16, unsigned codes in [0, 2^bits - 1]
    scale: torch.Tensor  # [O, G] in the storage dtype
    zero: torch.Tensor  # [O, G] int16, unsigned zero points in [0, 2^bits - 1]
    bits: int
    group_size: int

    def cpu(self) -> QuantizedWeight:
        """The same weight with its tensors in CPU memory (what the export writes from)."""
        return QuantizedWeight(
            self.codes.cpu(), self.scale.cpu(), self.zero.cpu(), self.bits, self.group_size
        )

    def dequantize(self) -> torch.Tensor:
        """(q - z) * s in float32: exact (a bits-wide integer times a bf16 or fp32 scale fits in
        float32), and what transformers decompresses the export to when it loads it in float32."""
        diff = _grouped(self.codes, self.group_size) - self.zero[..., None]  # [O, G, g]
        return (diff.float() * self.scale.float()[..., None]).reshape(self.codes.shape)


def quantize_weight(
    w: torch.Tensor, bits: int, group_size: int, dtype: torch.dtype = torch.bfloat16
) -> QuantizedWeight:
    """Final quantisation of `w` with its scales stored in `dtype`.

    The zero points and codes are computed with the scale already rounded to `dtype`, so the
    stored (codes, scale, zero) reproduce the weight as well as that dtype allows.
    """
    scale, zero = stored_group_scale_zero(w, bits, group_size, dtype)  # [O, G] each
    q = codes(w, scale.float(), zero, bits, group_size)
    return QuantizedWeight(q, scale, zero.to(torch.int16), bits, group_size)
