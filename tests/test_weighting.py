"""rlx/weighting.py without a model: the step's weights, totals and metrics from DynamicWeighting."""

from __future__ import annotations

import math

import pytest
import torch

from rlx.algos import pg
from rlx.config import PGConfig, load_config
from rlx.objectives import GradientWeighting, influences, mirror_descent_step
from rlx.weighting import DynamicWeighting


def test_reweigh_keeps_the_weight_of_an_objective_none_for_the_whole_step(capsys):
    cfg = load_config(PGConfig, None, ["weighting.method=gradient", "optim.max_grad_norm=0"])
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
        grads.append(
            ((r - r.mean(1, keepdim=True)) / (r.std(1, keepdim=True) + pg.EPS)).reshape(-1)
        )
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


def _gradient_weighting(bad_steps: str = "skip") -> DynamicWeighting:
    overrides = ["weighting.method=gradient", "optim.max_grad_norm=1.0"]
    cfg = load_config(PGConfig, None, [*overrides, f"bad_steps={bad_steps}"])
    return DynamicWeighting(cfg, ["a", "b"], GradientWeighting([0.5, 0.5], 1e-5))


def _two_objectives() -> dict:
    per_fn = torch.tensor([[[1.0, 0.0], [0.0, 1.0]], [[0.2, 0.5], [0.8, 0.1]]])  # [P, G, K]
    return {"per_fn": per_fn, "length": torch.ones(2, 2), "total": per_fn.sum(-1)}


def test_reweigh_survives_a_mini_batch_whose_sequences_are_all_masked():
    """mask_truncated_completions masked every sequence of the pass: the loop's loss over 0
    sequences (sequence_mean) must give a zero gradient, not NaN influences and a crash."""
    theta = torch.nn.Parameter(torch.randn(4, 3))
    weighting = _gradient_weighting()
    weighting.params = weighting.trainable = [theta]

    def backward(advantages, keep):  # the loop's pass with every completion truncated
        logp = torch.log_softmax(theta, -1)  # [B=4, T=3]
        mask = torch.zeros(4, 3)
        per_token, _, _ = pg.clipped_policy_loss(logp, logp.detach(), advantages.reshape(-1), mask)
        loss = pg.aggregate_loss(per_token, mask, "sequence_mean", num_sequences=0.0)
        loss.backward()

    _, weights = weighting.reweigh(_two_objectives(), backward, lr=1e-6)
    assert weights == pytest.approx([0.5, 0.5])  # zero gradients: nothing moves the weights


@pytest.mark.parametrize("bad_steps", ["skip", "error"])
def test_reweigh_with_a_non_finite_gradient_follows_bad_steps(bad_steps, capsys):
    """A non-finite gradient in an objective's pass: bad_steps=skip keeps the weights for this
    step (the loop's own finiteness check then skips the update), bad_steps=error stops."""
    theta = torch.nn.Parameter(torch.zeros(4))
    weighting = _gradient_weighting(bad_steps)
    weighting.params = weighting.trainable = [theta]

    def backward(advantages, keep):
        theta.grad = torch.full((4,), math.inf)

    if bad_steps == "error":
        with pytest.raises(FloatingPointError, match="bad_steps=skip"):
            weighting.reweigh(_two_objectives(), backward, lr=1e-6)
        return
    _, weights = weighting.reweigh(_two_objectives(), backward, lr=1e-6)
    assert weights == [0.5, 0.5] and theta.grad is None
    assert weighting.metrics["weighting_non_finite"] == 1.0
    assert "not finite" in capsys.readouterr().out
