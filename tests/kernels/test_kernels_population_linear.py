"""The population forward (rlx/kernels/population_linear.py) against its plain-torch reference, and
on a real HF model: per-member logits and KV-cached greedy generation equal explicitly merged
weights W + A_m B_m^T."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F
from transformers import AutoModelForCausalLM

from rlx.algos.eggroll import NoiseSpec, evolved_parameters, perturbation, population_adapter
from rlx.kernels import (
    PopulationLinear,
    member_blocks,
    perturbed_linears,
    population_linear,
    reference_population_linear,
)


def random_factors(members, d_out, d_in, rank, seed=0):
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(members, d_out, rank, generator=gen) * 0.1
    b = torch.randn(members, d_in, rank, generator=gen)
    return a, b


@pytest.mark.parametrize("method", ["fused", "bmm"])
@pytest.mark.parametrize("rank", [1, 4])
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("t", [5, 20])  # decode-sized and prefill-sized rows take different paths
def test_block_layout_matches_reference(method, rank, with_bias, t):
    members, per_member, d_in, d_out = 3, 2, 16, 24
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(members * per_member, t, d_in, generator=gen)
    w, bias = torch.randn(d_out, d_in, generator=gen), torch.randn(d_out, generator=gen)
    a, b = random_factors(members, d_out, d_in, rank)
    row_member = torch.arange(members).repeat_interleave(per_member)
    assert member_blocks(row_member, members) == per_member
    bias = bias if with_bias else None
    got = population_linear(x, w, bias, a, b, row_member, method)
    ref = reference_population_linear(x, w, bias, a, b, row_member)
    assert torch.allclose(got, ref, atol=1e-5)
    # a 2-D input (one position per row) works too
    assert torch.allclose(
        population_linear(x[:, 0], w, bias, a, b, row_member, method), ref[:, 0], atol=1e-5
    )


def test_auto_picks_fused_for_few_columns_else_bmm():
    w = torch.randn(8, 8)
    few = PopulationLinear(w, None, *random_factors(4, 8, 8, 1), torch.arange(4))
    many = PopulationLinear(w, None, *random_factors(40, 8, 8, 2), torch.arange(40))
    assert (few.method, many.method) == ("fused", "bmm")


@pytest.mark.parametrize("method", ["fused", "bmm"])
def test_irregular_layout_matches_reference(method):
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(5, 3, 8, generator=gen)
    w = torch.randn(12, 8, generator=gen)
    a, b = random_factors(3, 12, 8, 2)
    row_member = torch.tensor([2, 0, 0, 1, 2])
    assert member_blocks(row_member, 3) is None  # the bmm path gathers each row's factors
    ref = reference_population_linear(x, w, None, a, b, row_member)
    assert torch.allclose(population_linear(x, w, None, a, b, row_member, method), ref, atol=1e-5)


@pytest.mark.parametrize("method", ["fused", "bmm"])
def test_bfloat16_close_to_float32_reference(method):
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(4, 6, 32, generator=gen)
    w = torch.randn(32, 32, generator=gen) * 0.1
    a, b = random_factors(2, 32, 32, 1)
    rm = torch.tensor([0, 0, 1, 1])
    ref = reference_population_linear(x, w, None, a, b, rm)
    got = population_linear(
        x.bfloat16(), w.bfloat16(), None, a.bfloat16(), b.bfloat16(), rm, method
    )
    assert (got.float() - ref).abs().max() < 0.05 * ref.abs().max()


def test_row_count_mismatch_is_a_clear_error():
    a, b = random_factors(2, 4, 4, 1)
    with pytest.raises(ValueError, match="rows"):
        population_linear(torch.randn(3, 1, 4), torch.randn(4, 4), None, a, b, torch.tensor([0, 1]))


def test_perturbed_linears_take_scaled_low_rank_updates():
    """A stacked LowRank with scale != 1: row j sees W + scale * U_m V_m^T (the type's merge)."""
    from rlx.lowrank import LowRank, merged

    gen = torch.Generator().manual_seed(5)
    model = nn.Sequential(nn.Linear(8, 6))
    a, b = random_factors(2, 6, 8, 3)
    update = LowRank(a, b, scale=0.5)
    row_member = torch.tensor([0, 0, 1, 1])
    x = torch.randn(4, 5, 8, generator=gen)
    with torch.no_grad(), perturbed_linears(model, {"0": update}, row_member, "bmm"):
        got = model(x)
    layer = model[0]
    for j, m in enumerate(row_member.tolist()):
        ref = F.linear(x[j], merged(layer.weight.detach(), update.member(m)), layer.bias)
        assert torch.allclose(got[j], ref, atol=1e-5)


# ----------------------------------------------------------------------------- on an HF model

SIGMA = 0.05  # large enough that members generate different text on a random tiny model
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, CUDA])]


def merged_model(path, spec, names, member):
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name in names:
            params[name] += perturbation(spec, name, params[name].shape, 0, member)
    return model.eval()


def member_factors(model, spec, names, members):
    shapes = {n: p.shape for n, p in model.named_parameters() if n in names}
    return population_adapter(spec, shapes, 0, members)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("method", ["fused", "bmm"])
def test_model_logits_and_cached_generation_equal_merged_weights(tiny_llama, method, device):
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).to(device).eval()
    spec = NoiseSpec(seed=0, sigma=SIGMA, rank=2)
    names = list(evolved_parameters(model, ["all-linear"]))  # lm_head (untied) included
    members = [0, 1, 2]
    ids = torch.randint(3, 400, (2, 7), generator=torch.Generator().manual_seed(0)).to(device)
    rows = ids.repeat(len(members), 1)  # [6, 7], member-major
    row_member = torch.arange(len(members), device=device).repeat_interleave(2)
    factors = member_factors(model, spec, names, members)
    with torch.no_grad(), perturbed_linears(model, factors, row_member, method):
        logits = model(rows).logits  # [6, 7, V]
        generated = model.generate(
            rows,
            attention_mask=torch.ones_like(rows),
            max_new_tokens=8,
            do_sample=False,
            pad_token_id=0,
        )
    outputs = []
    for i, m in enumerate(members):
        ref_model = merged_model(tiny_llama, spec, names, m).to(device)
        with torch.no_grad():
            ref_logits = ref_model(ids).logits
            ref_gen = ref_model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=8,
                do_sample=False,
                pad_token_id=0,
            )
        assert torch.allclose(logits[2 * i : 2 * i + 2], ref_logits, atol=1e-4)
        assert torch.equal(generated[2 * i : 2 * i + 2], ref_gen)
        outputs.append(ref_gen[:, 7:].tolist())
    assert outputs[0] != outputs[1], "members should differ at this sigma"
    # the modules' own forward is back after the block
    with torch.no_grad():
        base = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
        assert torch.equal(model(ids).logits, base.to(device)(ids).logits)


def test_forward_restored_on_error_and_bad_names_rejected(tiny_llama):
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
    spec = NoiseSpec(seed=0, sigma=SIGMA, rank=1)
    factors = member_factors(model, spec, ["model.layers.0.mlp.up_proj.weight"], [0, 1])
    rows = torch.tensor([0, 1])
    with pytest.raises(RuntimeError, match="inside"), perturbed_linears(model, factors, rows):
        raise RuntimeError("inside")
    assert not any("forward" in vars(m) for m in model.modules())
    up = factors["model.layers.0.mlp.up_proj"]
    with pytest.raises(TypeError, match="not an nn.Linear"):
        perturbed_linears(model, {"model.layers.0.mlp": up}, rows).__enter__()
    with pytest.raises(ValueError, match="do not fit"):
        perturbed_linears(model, {"model.layers.0.mlp.down_proj": up}, rows).__enter__()
    assert not any("forward" in vars(m) for m in model.modules())


# ----------------------------------------------------------------------------- on a CUDA device


@pytest.mark.gpu
@CUDA
@pytest.mark.parametrize("method", ["fused", "bmm"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_matches_reference_at_smollm2_shapes(method, dtype):
    """Both paths on the GPU, at SmolLM2's widest projection (576 -> 1536), 32 members x 2 rows."""
    members, per_member, t, d_in, d_out = 32, 2, 9, 576, 1536
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(members * per_member, t, d_in, generator=gen)
    w = torch.randn(d_out, d_in, generator=gen) / d_in**0.5
    a, b = random_factors(members, d_out, d_in, 1, seed=5)
    row_member = torch.arange(members).repeat_interleave(per_member)
    ref = reference_population_linear(x, w, None, a, b, row_member)  # fp32 on the CPU
    x_gpu, w_gpu, a_gpu, b_gpu = [v.to("cuda", dtype) for v in (x, w, a, b)]
    got = population_linear(x_gpu, w_gpu, None, a_gpu, b_gpu, row_member.cuda(), method)
    got = got.float().cpu()
    tol = 1e-3 if dtype == torch.float32 else 0.02
    assert (got - ref).abs().max() < tol * ref.abs().max()
