"""rlx/weighting.py without a model: the step's weights, totals and metrics from DynamicWeighting."""

from __future__ import annotations

import math

import pytest
import torch

from rlx.config import PGConfig, load_config
from rlx.objectives import GradientWeighting, influences, mirror_descent_step
from rlx.weighting import DynamicWeighting


def test_reweigh_keeps_the_weight_of_an_objective_none_for_the_whole_step(capsys):
    cfg = load_config(PGConfig, None, ["algo.reward_weighting=gradient", "optim.max_grad_norm=0"])
    param = torch.nn.Parameter(torch.zeros(4))
    passes = []

    def backward(advantages, keep):  # a stand-in gradient: the objective's advantages
        passes.append(keep.tolist())
        param.grad = advantages.reshape(-1).clone()

    per_fn = torch.tensor(  # [P=2, G=2, K=3]; the third objective is None throughout
        [[[1.0, 0.0, math.nan], [0.0, 1.0, math.nan]], [[0.2, 0.5, math.nan], [0.8, 0.1, math.nan]]]
    )
    full = {"per_fn": per_fn, "length": torch.ones(2, 2), "total": torch.zeros(2, 2)}
    weighting = DynamicWeighting(cfg, ["a", "b", "c"], GradientWeighting([0.2, 0.3, 0.5], 1e-5))
    weighting.params = weighting.trainable = [param]
    new, weights = weighting.reweigh(full, backward, lr=1e-6)

    assert len(passes) == 2 and param.grad is None  # no pass for c; gradients cleared after
    assert weights[2] == 0.5 and sum(weights) == pytest.approx(1.0)
    grads = []
    for k in (0, 1):  # the expected step, by hand: GRPO advantages of each objective alone
        r = per_fn[..., k]
        grads.append(((r - r.mean(1, keepdim=True)) / (r.std(1, keepdim=True) + 1e-6)).reshape(-1))
    moved = mirror_descent_step([0.4, 0.6], influences(grads), lr=1e-6, mu=1e-5)
    assert weights[:2] == pytest.approx(0.5 * moved)
    assert weighting.metrics["none/c"] == 1.0 and "influence/c" not in weighting.metrics
    assert weighting.metrics["weight/c"] == 0.5
    expected = weights[0] * per_fn[..., 0] + weights[1] * per_fn[..., 1]
    assert torch.allclose(new["total"], expected)
    assert (
        "c (weight 0.500): None for every sample of the step; weight kept"
        in capsys.readouterr().out
    )
