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


# --- the hypervolume meta-reward acts on the parameters ---------------------------------------


def _toy_update(factor: float) -> torch.Tensor:
    """One step of the loop's sequence on a toy policy (softmax over 3 actions of a linear layer)
    under the hypervolume feature with meta-reward `factor`: rewards -> advantages -> the
    feature's after_advantages -> loss, clip, AdamW step, scheduler step -> after_step. Returns
    the parameter change."""
    from types import SimpleNamespace

    from rlx.objectives import HypervolumeWeighting

    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)  # as recipes/pg.py's
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)  # HF's "constant"
    cfg = load_config(PGConfig, None, ["weighting.method=hypervolume", "weighting.hv_every=99"])
    method = HypervolumeWeighting([False, False], [0.5, 0.5])
    method.factor = factor
    weighting = DynamicWeighting(cfg, ["a", "b"], method)
    weighting.optimizer = optimizer
    x, actions = torch.randn(8, 4), torch.randint(0, 3, (8,))
    per_fn = torch.rand(2, 4, 2)  # [P, G, K]
    full = {"per_fn": per_fn, "length": torch.ones(2, 4), "total": per_fn.sum(-1)}
    step = SimpleNamespace(full=full, weights=[0.5, 0.5], backward=None, lr=1e-2)
    weighting.after_rewards(step)
    step.advantages, _ = pg.kept_advantages(
        "grpo", step.full["total"], per_fn, full["length"], step.weights, "normalize_then_sum", True
    )
    weighting.after_advantages(step)
    before = [p.detach().clone() for p in model.parameters()]
    logp = torch.log_softmax(model(x), -1)[torch.arange(8), actions]
    loss = -(step.advantages.reshape(-1) * logp).mean()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    scheduler.step()
    weighting.after_step(1)
    assert optimizer.param_groups[0]["lr"] == 1e-2  # unscaled again, as the checkpoint saves it
    after = list(model.parameters())
    return torch.cat([(p.detach() - b).reshape(-1) for p, b in zip(after, before, strict=True)])


def test_the_meta_reward_scales_the_parameter_change():
    """The meta-reward is a learning-rate factor: the step's parameter change scales with it.
    Multiplying the advantages instead (rlx before issue 30) leaves AdamW's first step unchanged:
    it divides by the gradient's own scale."""
    half, one, double = _toy_update(0.5), _toy_update(1.0), _toy_update(2.0)
    assert one.abs().max() > 1e-4
    assert torch.allclose(half, 0.5 * one, rtol=1e-4, atol=1e-9)
    assert torch.allclose(double, 2.0 * one, rtol=1e-4, atol=1e-9)


def test_restore_learning_rate_keeps_what_the_scheduler_set_since():
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    cfg = load_config(PGConfig, None, ["weighting.method=hypervolume"])
    weighting = DynamicWeighting(cfg, ["a", "b"], GradientWeighting([0.5, 0.5]))
    weighting.method.factor = 2.0
    weighting.optimizer = optimizer
    weighting.scale_learning_rate()
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.2)
    weighting.scale_learning_rate()  # twice (a skipped step in between): not 0.4
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.2)
    optimizer.param_groups[0]["lr"] = 0.05  # scheduler.step after the update
    weighting.restore_learning_rate()
    assert optimizer.param_groups[0]["lr"] == 0.05


# --- the gradient method's step ---------------------------------------------------------------


def test_each_objectives_gradient_uses_every_group_the_step_trains_on():
    """Objective b is constant in group 1: its pass still runs on both groups (the whole batch's
    sequence and token counts divide its loss, as in the reference), with advantage 0 there; its
    advantages are its group z-scores under normalize_then_sum."""
    overrides = ["weighting.method=gradient", "algo.reward_normalization=normalize_then_sum"]
    cfg = load_config(PGConfig, None, overrides)
    param = torch.nn.Parameter(torch.zeros(4))
    passes = []

    def backward(advantages, keep):
        passes.append((advantages.clone(), keep.tolist()))
        param.grad = advantages.reshape(-1).clone()

    per_fn = torch.tensor([[[1.0, 0.0], [0.0, 1.0]], [[0.2, 0.5], [0.8, 0.5]]])  # [P, G, K]
    full = {"per_fn": per_fn, "length": torch.ones(2, 2), "total": per_fn.sum(-1)}
    weighting = DynamicWeighting(cfg, ["a", "b"], GradientWeighting([0.5, 0.5], 1e-5))
    weighting.params = weighting.trainable = [param]
    weighting.reweigh(full, backward, lr=1e-6)
    assert [keep for _, keep in passes] == [[True, True], [True, True]]
    b = passes[1][0]
    assert b[1].tolist() == [0.0, 0.0] and b[0, 0] == pytest.approx(-b[0, 1])
    z = (per_fn[0, :, 1] - per_fn[0, :, 1].mean()) / (per_fn[0, :, 1].std() + pg.EPS)
    assert torch.allclose(b[0], z)


def test_normalize_then_sum_is_the_weighted_sum_of_the_objective_advantages():
    """The update's advantages are the batch-normalised sum_k w_k A_k of the per-objective
    advantages the influences use: the update moves along the weighted sum of their gradients."""
    torch.manual_seed(1)
    per_fn = torch.rand(4, 6, 3).round(decimals=1)
    per_fn[1, :, 0] = 0.5  # constant in one group
    weights = [0.5, 0.3, 0.2]
    lengths = torch.ones(4, 6)
    keep = torch.ones(4, dtype=torch.bool)
    parts = pg.objective_advantages("grpo", per_fn, lengths, keep, "normalize_then_sum")
    summed = (parts * torch.tensor(weights)).sum(-1)
    expected = (summed - summed.mean()) / (summed.std() + pg.EPS)
    actual = pg.weighted_advantages("grpo", None, per_fn, lengths, weights, "normalize_then_sum")
    assert torch.allclose(actual, expected, atol=1e-5)


def test_influences_without_the_self_term():
    g = [torch.tensor([1.0, 0.0]), torch.tensor([1.0, 1.0]), torch.tensor([0.0, -2.0])]
    assert influences(g).tolist() == [2.0, 1.0, 2.0]  # <g_k, (2, -1)>
    assert influences(g, self_term=False).tolist() == [1.0, -1.0, -2.0]  # less |g_k|^2


def test_gradient_weighting_moves_every_k_steps_by_the_mean_influence_and_resumes():
    """weighting.grad_accumulation_steps=3: the weights stay for two steps, then take one step
    with the mean influence (an objective None in one step: its mean over the others); the
    half-filled window survives a checkpoint."""
    import json

    a = GradientWeighting([0.5, 0.5], mu=1e-5, accumulation_steps=3)
    assert a.step([1.0, 3.0], lr=1e-6).tolist() == [0.5, 0.5]
    b = GradientWeighting([0.2, 0.8], mu=1.0, accumulation_steps=3)
    b.load_state_dict(json.loads(json.dumps(a.state_dict())))
    for method in (a, b):
        assert method.step([2.0, None], lr=1e-6).tolist() == [0.5, 0.5]
        moved = method.step([3.0, 1.0], lr=1e-6)
        assert moved == pytest.approx(mirror_descent_step([0.5, 0.5], [2.0, 2.0], 1e-6, 1e-5))
    a.step([1.0, 0.0], lr=1e-6)
    assert a.calls == 1 and a.pending.tolist() == [1.0, 0.0]


def test_the_recipe_steps_the_weights_as_the_reference():
    """recipes/multi_objective.yaml: lr / lambda = 0.1 (the reference's 1e-6 / 1e-5), the
    correctness-conditioned conciseness, and normalize_then_sum."""
    cfg = load_config(PGConfig, "recipes/multi_objective.yaml", [])
    assert cfg.optim.lr / cfg.weighting.grad_lambda == pytest.approx(0.1)
    assert cfg.algo.reward_normalization == "normalize_then_sum"
    assert [r.func.split(":")[1] for r in cfg.rewards] == [
        "correctness",
        "concise_correct",
        "step_format",
    ]
