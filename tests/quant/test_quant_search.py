"""Group quantiser, scale folding, the AWQ scale / clip searches, and the per-layer group plan."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM

from rlx.models.tiny import tiny_config
from rlx.quant.checks import (
    Geometry,
    QuantError,
    check_int4_kernel,
    effective_group_size,
    layer_group_sizes,
)
from rlx.quant.importance import activation_importance
from rlx.quant.pipeline import _first_layer_inputs
from rlx.quant.quantizer import (
    clip_groups,
    fake_quantize,
    group_scale_zero,
    quantize_weight,
)
from rlx.quant.scale_search import (
    SCALE_GROUPS,
    HeadLayout,
    alpha_scales,
    awq_layer,
    fold_scales,
    gram,
    search_clip,
)

SMOLLM2 = Geometry(
    "llama", hidden=576, intermediate=1536, layers=30, heads=9, kv_heads=3, head_dim=64
)


@pytest.mark.parametrize("bits", [3, 4])
def test_quantize_weight_codes_scales_and_error(bits):
    w = torch.randn(8, 256, generator=torch.Generator().manual_seed(0))
    qw = quantize_weight(w, bits, 64, torch.float32)
    assert qw.codes.min() >= 0 and qw.codes.max() <= 2**bits - 1
    assert qw.scale.shape == qw.zero.shape == (8, 4)
    err = (qw.dequantize() - w).abs().view(8, 4, 64).amax(-1)
    assert torch.all(err <= qw.scale / 2 + 1e-6)  # round to nearest: at most half a step
    assert torch.equal(qw.dequantize(), fake_quantize(w, bits, 64))  # search == export


def test_quantize_weight_bf16_scales_and_constant_group():
    w = torch.randn(4, 128)
    w[0, :64] = 0.5  # constant and one-signed: the range [0, 0.5] keeps it representable
    w[1, :64] = torch.linspace(1.0, 1.1, 64)  # one-signed and narrow
    qw = quantize_weight(w, 4, 64, torch.bfloat16)
    assert qw.scale.dtype == torch.bfloat16
    for row in (0, 1):  # within half a step (of the bf16-rounded scale) of the true weights
        err = (qw.dequantize()[row, :64] - w[row, :64]).abs().max()
        assert err <= qw.scale[row, 0].float() / 2 + 1e-6
    scale, zero = group_scale_zero(w, 4, 64)
    assert torch.all(zero >= 0) and torch.all(zero <= 15) and torch.all(scale > 0)


def test_clip_groups_and_search_clip_never_worse_than_no_clip():
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(16, 128, generator=gen)
    w[:, 3] *= 8  # outliers make clipping worthwhile
    x = torch.randn(512, 128, generator=gen)
    g = gram(x, 64)
    assert g.shape == (2, 64, 64)
    max_val = search_clip(w, g, 4, 64)
    org_max = w.view(16, 2, 64).abs().amax(-1)
    assert torch.all(max_val <= org_max) and torch.all(max_val >= org_max * 0.5)

    def out_err(wq):
        return ((x @ (wq - w).T) ** 2).mean()

    clipped = fake_quantize(clip_groups(w, 64, max_val), 4, 64)
    assert out_err(clipped) <= out_err(fake_quantize(w, 4, 64)) + 1e-6


def test_alpha_zero_means_no_scaling():
    assert torch.allclose(alpha_scales(torch.tensor([0.1, 5.0, 80.0]), 0.0), torch.ones(3))


def test_head_layout_ties_o_scales_to_kv_heads():
    heads = HeadLayout(heads=4, kv_heads=2, head_dim=2)
    v = torch.arange(8.0)  # heads 0,1 share kv 0; heads 2,3 share kv 1
    assert heads.to_kv(v).tolist() == [1.0, 2.0, 5.0, 6.0]
    assert heads.to_heads(torch.tensor([1.0, 2.0, 3.0, 4.0])).tolist() == [1, 2, 1, 2, 3, 4, 3, 4]


@pytest.fixture(scope="module")
def sharp_model():
    """A random 2-layer Llama with larger weights (a sharper function than the 0.02 init)."""
    torch.manual_seed(0)
    config = tiny_config("llama", vocab_size=512, tie_embeddings=False)  # 2 heads, 1 KV head: GQA
    config.initializer_range = 0.15
    return AutoModelForCausalLM.from_config(config).eval()


def _layer_and_inputs(model, dtype=torch.float32):
    ids = torch.randint(0, 512, (4, 64), generator=torch.Generator().manual_seed(2))
    x, kwargs = _first_layer_inputs(model, ids, dtype)
    return copy.deepcopy(model.model.layers[0]), x, kwargs


def test_fold_scales_is_exact_for_every_group(sharp_model):
    layer, x, kwargs = _layer_and_inputs(sharp_model)
    heads = HeadLayout(2, 1, 64)
    with torch.no_grad():
        ref = layer(x, **kwargs)
        for group in SCALE_GROUPS:
            size = layer.get_submodule(group.linears[0]).in_features
            size = 64 if group.name == "o" else size  # o scales live in v_proj's 64 outputs
            s = torch.rand(size, generator=torch.Generator().manual_seed(3)) + 0.5
            fold_scales(layer, group, s, heads)
        out = layer(x, **kwargs)
    assert torch.allclose(out, ref, rtol=1e-5, atol=1e-4)


def _quantized_layer_error(layer, x, kwargs, ref, group_sizes):
    q = copy.deepcopy(layer)
    with torch.no_grad():
        for group in SCALE_GROUPS:
            for name in group.linears:
                lin = q.get_submodule(name)
                lin.weight.copy_(fake_quantize(lin.weight, 3, group_sizes[name]))
        return (q(x, **kwargs) - ref).pow(2).mean().item()


def test_awq_layer_beats_round_to_nearest(sharp_model):
    """Scale + clip search on activation importance lowers the W3 layer-output error vs RTN."""
    layer, x, kwargs = _layer_and_inputs(sharp_model)
    x = x.clone()
    x[..., 5] *= 20  # an outlier input channel, the situation AWQ is built for
    group_sizes = {name: 64 for group in SCALE_GROUPS for name in group.linears}
    with torch.no_grad():
        ref = layer(x, **kwargs)
    rtn_err = _quantized_layer_error(layer, x, kwargs, ref, group_sizes)
    report = awq_layer(
        layer,
        x,
        kwargs,
        lambda _n, feat: activation_importance(feat),
        group_sizes,
        3,
        HeadLayout(2, 1, 64),
        n_grid=10,
        search_dtype=torch.float32,
    )
    assert set(report.alphas) == {"qkv", "o", "gate_up", "down"}
    assert torch.allclose(report.output, ref, atol=1e-5)  # next layer gets the unquantised output
    assert _quantized_layer_error(layer, x, kwargs, ref, group_sizes) < rtn_err


def test_awq_layer_with_gptq_rounding_beats_nearest_after_the_same_search(sharp_model):
    """GPTQ-rounded linears (returned by awq_layer) give a lower W3 layer-output error than
    rounding the same searched, folded and clipped weights to nearest."""
    layer, x, kwargs = _layer_and_inputs(sharp_model)
    group_sizes = {name: 64 for group in SCALE_GROUPS for name in group.linears}
    with torch.no_grad():
        ref = layer(x, **kwargs)
    report = awq_layer(
        layer,
        x,
        kwargs,
        lambda _n, feat: activation_importance(feat),
        group_sizes,
        3,
        HeadLayout(2, 1, 64),
        n_grid=10,
        search_dtype=torch.float32,
        gptq_dtype=torch.float32,
    )
    names = [name for group in SCALE_GROUPS for name in group.linears]
    assert sorted(report.quantized) == sorted(names)
    nearest_err = _quantized_layer_error(layer, x, kwargs, ref, group_sizes)
    q = copy.deepcopy(layer)
    with torch.no_grad():
        for name in names:
            q.get_submodule(name).weight.copy_(report.quantized[name].dequantize())
        gptq_err = (q(x, **kwargs) - ref).pow(2).mean().item()
    assert gptq_err < nearest_err, (gptq_err, nearest_err)


def test_group_plan_falls_back_where_128_does_not_divide():
    assert effective_group_size(1536, 128) == 128
    assert effective_group_size(576, 128) == 64  # SmolLM2: 576 = 4.5 x 128
    assert effective_group_size(96, 128) == 32
    with pytest.raises(QuantError, match="divides in_features 100"):
        effective_group_size(100, 128)
    plan = layer_group_sizes(SMOLLM2, 128)
    assert plan["mlp.down_proj"] == 128
    assert {plan[n] for n in plan if n != "mlp.down_proj"} == {64}
    with pytest.raises(QuantError, match="group_size must be one of"):
        layer_group_sizes(SMOLLM2, 96)


def test_int4_kernel_check_names_the_bad_layer():
    check_int4_kernel(SMOLLM2)
    odd = Geometry(
        "llama", hidden=128, intermediate=200, layers=1, heads=2, kv_heads=1, head_dim=64
    )
    with pytest.raises(QuantError, match=r"mlp.gate_proj \(128 -> 200\)"):
        check_int4_kernel(odd)
