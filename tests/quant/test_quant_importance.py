"""QuantLRM importance on hand-built dW, and AWQ's activation statistic."""

from __future__ import annotations

import pytest
import torch

from rlx.quant.importance import (
    DeltaStats,
    abs_delta,
    activation_importance,
    channel_importance,
    delta_stats,
    quantlrm_importances,
    restricted_quadratic,
)


def test_delta_stats_ignore_zeros_and_take_exact_median():
    stats = delta_stats([torch.tensor([[0.0, 1.0], [2.0, 0.0]]), torch.tensor([[3.0, 4.0]])])
    assert stats == DeltaStats(x_min=1.0, x_mid=2.5, x_max=4.0, nonzero=4, zeros=2)
    odd = delta_stats([torch.tensor([5.0, 0.0, 1.0, 3.0])])
    assert (odd.x_min, odd.x_mid, odd.x_max) == (1.0, 3.0, 5.0)


def test_delta_stats_rejects_identical_models():
    with pytest.raises(ValueError, match="identical"):
        delta_stats([torch.zeros(2, 2)])


def test_restricted_quadratic_protects_both_ends():
    stats = DeltaStats(x_min=1.0, x_mid=3.0, x_max=7.0, nonzero=3, zeros=0)
    x = torch.tensor([0.0, 1.0, 2.0, 3.0, 5.0, 7.0])
    # zero -> 1; x_min and x_max -> R; median -> 1; halfway on either side -> 1 + 9/4
    expected = torch.tensor([1.0, 10.0, 3.25, 1.0, 3.25, 10.0])
    assert torch.allclose(restricted_quadratic(x, stats, radius=10.0), expected)


def test_restricted_quadratic_with_degenerate_side_is_one():
    stats = DeltaStats(x_min=2.0, x_mid=2.0, x_max=4.0, nonzero=3, zeros=0)
    assert torch.allclose(
        restricted_quadratic(torch.tensor([2.0, 4.0]), stats), torch.tensor([1.0, 10.0])
    )


def test_channel_importance_by_hand():
    dw = torch.tensor([[0.0, 1.0, 4.0], [0.0, 3.0, 0.0]])
    stats = delta_stats([dw])  # nonzero {1, 3, 4}: min 1, median 3, max 4
    # y = [[1, 10, 10], [1, 1, 1]]; column means [1, 5.5, 5.5]; zero counts + 1 = [3, 1, 2]
    assert torch.allclose(channel_importance(dw, stats), torch.tensor([3.0, 5.5, 11.0]))


def test_abs_delta_in_bfloat16_counts_sub_ulp_updates_as_zero():
    before = torch.tensor([[1.0, 1.0]])
    after = torch.tensor([[1.0 + 1e-4, 1.5]])  # 1e-4 is below bf16's ulp at 1.0 (2^-7)
    assert abs_delta(before, after, torch.bfloat16).tolist() == [[0.0, 0.5]]
    assert abs_delta(before, after, torch.float32)[0, 0] > 0


def test_quantlrm_importances_use_global_stats_and_share_q():
    gen = torch.Generator().manual_seed(0)
    names = [[f"l{i}.q.weight", f"l{i}.k.weight", f"l{i}.gate.weight"] for i in range(2)]
    before = {n: torch.randn(4, 6, generator=gen) for row in names for n in row}
    after = {n: w + 0.1 * torch.randn(4, 6, generator=gen) for n, w in before.items()}
    after["l1.k.weight"][0, 0] += 5.0  # a huge k update moves the global x_max
    imps, stats = quantlrm_importances(
        before, after, names, ["q.weight", "gate.weight"], delta_dtype=torch.float32
    )
    assert stats.x_max == pytest.approx(
        abs_delta(before["l1.k.weight"], after["l1.k.weight"], torch.float32).max().item()
    )
    dq = abs_delta(before["l0.q.weight"], after["l0.q.weight"], torch.float32)
    assert torch.allclose(imps[0]["q.weight"], channel_importance(dq, stats))
    assert set(imps[1]) == {"q.weight", "gate.weight"} and imps[1]["q.weight"].shape == (6,)


def test_activation_importance_is_mean_abs_per_channel():
    x = torch.tensor([[[1.0, -2.0], [-3.0, 4.0]]])  # [N, L, C]
    assert activation_importance(x).tolist() == [2.0, 3.0]
