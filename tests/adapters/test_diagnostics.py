"""Spectral diagnostics against hand-built weight pairs, the diff utility and the per-step probe."""

from __future__ import annotations

import math

import pytest
import torch

from rlx.adapters import diagnostics as dg
from rlx.adapters.diff import WeightMismatch, weight_delta, weight_deltas

K = 3


def orthonormal(n: int, seed: int) -> torch.Tensor:
    q, _ = torch.linalg.qr(
        torch.randn(n, n, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    )
    return q


@pytest.fixture
def w0():
    """W0 = U diag(s) V^T [12, 10] with distinct singular values 10, 9, ..., 1."""
    u, v = orthonormal(12, 0)[:, :10], orthonormal(10, 1)
    return u, torch.arange(10, 0, -1, dtype=torch.float64), v


def build(u, s, v):
    return (u * s) @ v.T


def test_update_inside_the_principal_subspace_has_alignment_one(w0):
    u, s, v = w0
    dw = u[:, :K] @ torch.randn(K, K, dtype=torch.float64) @ v[:, :K].T
    assert dg.update_alignment(dw, u[:, :K], v[:, :K]) == pytest.approx(1.0, abs=1e-12)
    assert dg.principal_share(dw, u[:, :K], v[:, :K]) == pytest.approx(1.0, abs=1e-12)


def test_update_off_the_principal_subspace_has_alignment_zero(w0):
    u, s, v = w0
    dw = u[:, K:] @ torch.randn(10 - K, 10 - K, dtype=torch.float64) @ v[:, K:].T
    assert dg.update_alignment(dw, u[:, :K], v[:, :K]) == pytest.approx(0.0, abs=1e-12)
    assert dg.principal_share(dw, u[:, :K], v[:, :K]) == pytest.approx(0.0, abs=1e-12)
    # principal on one side only: outside the doubly principal block, but touched by the guard
    one_sided = u[:, :K] @ torch.randn(K, 10 - K, dtype=torch.float64) @ v[:, K:].T
    assert dg.update_alignment(one_sided, u[:, :K], v[:, :K]) == pytest.approx(0.0, abs=1e-12)
    assert dg.principal_share(one_sided, u[:, :K], v[:, :K]) == pytest.approx(1.0, abs=1e-12)


def test_identical_matrices_rotate_zero_and_keep_their_spectrum(w0):
    w = build(*w0)
    m = dg.matrix_diagnostics(w, w.clone(), K)
    assert m["rotation_deg"] == pytest.approx(0.0, abs=1e-4)
    assert m["spectral_drift"] == 0.0
    assert m["bf16_sparsity"] == 1.0 and m["update_density"] == 0.0
    assert math.isnan(m["alignment"]) and math.isnan(m["principal_overlap"])


def test_rotation_measures_the_turned_principal_direction(w0):
    u, s, v = w0
    theta = math.radians(20)
    turned = u.clone()  # turn the top left singular vector towards a minor one (index 8)
    turned[:, 0] = math.cos(theta) * u[:, 0] + math.sin(theta) * u[:, 8]
    turned[:, 8] = -math.sin(theta) * u[:, 0] + math.cos(theta) * u[:, 8]
    m = dg.matrix_diagnostics(build(u, s, v), build(turned, s, v), K)
    assert m["rotation_deg"] == pytest.approx(20.0, abs=1e-6)
    assert m["spectral_drift"] == pytest.approx(0.0, abs=1e-12)  # a rotation keeps the spectrum


def test_spectral_drift_is_the_relative_change_of_singular_values(w0):
    u, s, v = w0
    m = dg.matrix_diagnostics(build(u, s, v), build(u, 1.5 * s, v), K)
    assert m["spectral_drift"] == pytest.approx(0.5, abs=1e-12)
    assert m["rotation_deg"] == pytest.approx(0.0, abs=1e-4)
    assert m["alignment"] < 1  # dW = 0.5 W0 spreads over all directions


def test_bf16_sparsity_counts_updates_lost_at_bf16():
    w0 = torch.full((4, 4), 1.0)
    wt = w0.clone()
    wt[:2] += 1e-4  # below bf16's ulp at 1.0 (2^-7): vanishes
    wt[2:] += 0.25  # survives
    m = dg.matrix_diagnostics(w0, wt, 1)
    assert m["bf16_sparsity"] == 0.5 and m["update_density"] == 0.5


def test_mask_overlaps_with_principal_and_low_magnitude_entries():
    # W0 rank 1: its top-1 reconstruction is W0 itself; big entries in the top-left block
    x = torch.tensor([4.0, 3.0, 0.01, 0.02], dtype=torch.float64)
    w0 = torch.outer(x, x)
    big = dg.bf16_update_mask(w0, w0 + torch.where(w0 > 1, 1.0, 0.0))  # updates the 4 big ones
    assert int(big.sum()) == 4
    m = dg.matrix_diagnostics(w0, w0 + torch.where(w0 > 1, 1.0, 0.0), 1)
    assert m["principal_overlap"] == 1.0 and m["low_magnitude_overlap"] == 0.0
    small = torch.where(w0 < 1e-3, 0.5, 0.0)  # the 4 smallest entries
    m = dg.matrix_diagnostics(w0, w0 + small, 1)
    assert m["principal_overlap"] == 0.0 and m["low_magnitude_overlap"] == 1.0


def test_summary_averages_per_layer_type():
    rows = {
        "model.layers.0.self_attn.q_proj.weight": dict.fromkeys(dg.METRICS, 1.0),
        "model.layers.1.self_attn.q_proj.weight": dict.fromkeys(dg.METRICS, 3.0),
        "model.layers.0.mlp.up_proj.weight": dict.fromkeys(dg.METRICS, math.nan),
    }
    out = dg.summarize(rows)
    assert out["q_proj"]["alignment"] == 2.0 and out["all"]["alignment"] == 2.0
    assert math.isnan(out["up_proj"]["alignment"])
    assert dg.layer_index("model.layers.12.mlp.up_proj.weight") == 12


def test_weight_delta_rounds_to_the_storage_dtype_and_checks_shapes():
    before, after = torch.tensor([[1.0, 2.0]]), torch.tensor([[1.0 + 1e-4, 2.5]])
    assert weight_delta(before, after, torch.bfloat16).tolist() == [[0.0, 0.5]]
    assert weight_delta(before, after)[0, 0] > 0
    with pytest.raises(WeightMismatch, match="shapes differ"):
        weight_delta(before, torch.zeros(2, 1))
    sd = {"model.layers.0.mlp.up_proj.weight": before, "model.norm.weight": torch.ones(2)}
    assert [n for n, _ in weight_deltas(sd, dict(sd))] == ["model.layers.0.mlp.up_proj.weight"]
    with pytest.raises(WeightMismatch, match="missing from the fine-tuned"):
        list(weight_deltas(sd, {}))


def test_probe_sees_the_guard(policy, train):
    from rlx.adapters import diagnostics_row, make_probe
    from rlx.config import AdapterConfig

    rows = {}
    for guard in (0, 4):
        cfg = AdapterConfig(
            method="lora", rank=4, principal_guard=guard, diagnostics_every=2, diagnostics_top_k=4
        )
        model = policy(cfg)
        probe = make_probe(model, cfg)
        assert len(probe.names) == 4 and diagnostics_row(probe, model, 1, 2) == {}
        train(model, cfg, steps=3, lr=1e-2)
        rows[guard] = diagnostics_row(probe, model, 2, 2)
    assert rows[4]["diag/principal_share"] < 1e-5 < 1e-2 < rows[0]["diag/principal_share"]
    assert 0 <= rows[0]["diag/bf16_sparsity"] < 1


def test_probe_measures_factor_adapters_in_fp32_on_a_bf16_base(tiny_llama, train):
    """On a bf16 base, s B A merged in bf16 is mostly rounding: the probe takes dW from the fp32
    factors, so the guard's exact projection shows as a principal share of ~0."""
    from rlx.adapters import diagnostics_row, make_probe
    from rlx.config import AdapterConfig, ModelConfig
    from rlx.policy import load_policy

    cfg = AdapterConfig(
        method="lora", rank=4, principal_guard=4, diagnostics_every=1, diagnostics_top_k=4
    )
    torch.manual_seed(0)
    model, _ = load_policy(ModelConfig(name=tiny_llama, dtype="bfloat16"), cfg)
    probe = make_probe(model, cfg)
    train(model, cfg, steps=2, lr=1e-4)  # merged in bf16 the share read 0.068
    row = diagnostics_row(probe, model, 1, 1)
    assert row["diag/principal_share"] < 1e-5 and row["diag/alignment"] < 1e-5, row
    assert 0 < row["diag/bf16_sparsity"] < 1


def test_probe_mean_skips_a_matrix_without_update(policy):
    """A probed matrix whose dW is 0 has no alignment (nan): the mean is over the others, as
    summarize does, not nan."""
    from rlx.adapters import make_probe
    from rlx.config import AdapterConfig

    cfg = AdapterConfig(method="lora", rank=4, diagnostics_every=1, diagnostics_top_k=4)
    model = policy(cfg)
    probe = make_probe(model, cfg)
    layers = dict(model.get_base_model().named_modules())
    first = layers[probe.names[0].removesuffix(".weight")]
    with torch.no_grad():  # only the first probed matrix moves (LoRA's B starts at 0)
        first.lora_B["default"].weight.normal_(0, 0.1)
    row = probe.metrics(model)
    assert all(math.isfinite(v) for v in row.values()), row
    assert 0 < row["diag/principal_share"] <= 1


def test_probe_refused_under_zero3_full_fine_tuning(policy):
    """ZeRO-3 partitions the weights the probe reads: refused at set-up, by the loop's check of
    the zero stage and by the probe itself when it meets a partitioned (empty) weight."""
    from rlx.adapters import check_probe_sharding, make_probe
    from rlx.config import AdapterConfig, ConfigError

    cfg = AdapterConfig(method="none", diagnostics_every=5)
    with pytest.raises(ConfigError, match="adapter.diagnostics_every=5 under DeepSpeed ZeRO-3"):
        check_probe_sharding(cfg, zero_stage=3)
    check_probe_sharding(cfg, zero_stage=2)
    check_probe_sharding(AdapterConfig(method="none"), zero_stage=3)  # diagnostics off
    model = policy(cfg)
    with torch.no_grad():  # what a ZeRO-3 rank holds of a weight outside a gather
        model.model.layers[0].self_attn.q_proj.weight.data = torch.empty(0)
    with pytest.raises(ConfigError, match="partitioned"):
        make_probe(model, cfg)


@pytest.mark.parametrize("method", ["lora", "minor", "mica", "pissa", "adalora", "dora", "miss"])
def test_factor_delta_is_pefts_delta_weight(method, policy):
    """The probe's fp32 c B A equals PEFT's own delta for every product adapter (None for DoRA
    and MiSS, which the probe reads merged)."""
    from rlx.adapters.merge import tuner_layers
    from rlx.adapters.probe import factor_delta
    from rlx.config import AdaLoraConfig, AdapterConfig

    cfg = AdapterConfig(method=method, rank=4, alpha=8.0, adalora=AdaLoraConfig(target_rank=2))
    model = policy(cfg, total_steps=10)
    layer = tuner_layers(model.get_base_model())["model.layers.0.self_attn.q_proj"]
    delta = factor_delta(layer)
    if method in ("dora", "miss"):
        assert delta is None
        return
    for name, param in layer.named_parameters():  # LoRA's B starts at 0: move every factor
        if "lora_" in name:
            param.data.normal_(0, 0.1, generator=torch.Generator().manual_seed(len(name)))
    with torch.no_grad():
        torch.testing.assert_close(factor_delta(layer), layer.get_delta_weight("default"))
