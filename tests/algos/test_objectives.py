"""rlx.objectives against hand-computed hypervolumes, Pareto buffers and mirror-descent steps."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from rlx.objectives import (
    GAIN_FLOOR,
    GradientWeighting,
    HypervolumeWeighting,
    ParetoBuffer,
    check_weights,
    dominates,
    hypervolume,
    hypervolume_direction,
    influences,
    meta_reward,
    mirror_descent_step,
    orient,
    pareto_front,
)

# --- hypervolume 2-D --------------------------------------------------------------------------


def test_hypervolume_2d_one_point():
    assert hypervolume([(3.0, 2.0)], (0.0, 0.0)) == pytest.approx(6.0)  # 3 * 2
    assert hypervolume([(3.0, 2.0)], (1.0, -1.0)) == pytest.approx(6.0)  # (3-1) * (2+1)


def test_hypervolume_2d_two_points_overlap_once():
    # boxes 3x1 and 1x3 overlap in the unit square: 3 + 3 - 1 = 5
    assert hypervolume([(3.0, 1.0), (1.0, 3.0)], (0.0, 0.0)) == pytest.approx(5.0)


def test_hypervolume_2d_three_points_staircase():
    # staircase (3,1), (2,2), (1,3): strips 3*1 + 2*(2-1) + 1*(3-2) = 6, in any input order
    pts = [(1.0, 3.0), (3.0, 1.0), (2.0, 2.0)]
    assert hypervolume(pts, (0.0, 0.0)) == pytest.approx(6.0)
    assert hypervolume(pts[::-1], (0.0, 0.0)) == pytest.approx(6.0)


def test_hypervolume_2d_dominated_point_adds_nothing():
    # (1,1) lies inside the box of (3,1): still 5
    assert hypervolume([(3.0, 1.0), (1.0, 3.0), (1.0, 1.0)], (0.0, 0.0)) == pytest.approx(5.0)


def test_hypervolume_2d_point_below_reference_is_clipped():
    # (-1, 5) is worse than the reference in x, (4, 0) ties it in y: both boxes are empty
    assert hypervolume([(-1.0, 5.0)], (0.0, 0.0)) == 0.0
    assert hypervolume([(3.0, 2.0), (-1.0, 5.0), (4.0, 0.0)], (0.0, 0.0)) == pytest.approx(6.0)


def test_hypervolume_empty_is_zero():
    assert hypervolume([], (0.0, 0.0)) == 0.0
    assert hypervolume(np.empty((0, 3)), (0.0, 0.0, 0.0)) == 0.0


# --- hypervolume 3-D --------------------------------------------------------------------------


def test_hypervolume_3d_box():
    assert hypervolume([(2.0, 3.0, 4.0)], (0.0, 0.0, 0.0)) == pytest.approx(24.0)  # 2*3*4
    assert hypervolume([(2.0, 3.0, 4.0)], (1.0, 0.0, -1.0)) == pytest.approx(15.0)  # 1*3*5


def test_hypervolume_3d_two_overlapping_boxes():
    # 2*3*4 + 4*2*1 - min-corner (2,2,1) -> 24 + 8 - 4 = 28
    assert hypervolume([(2.0, 3.0, 4.0), (4.0, 2.0, 1.0)], (0.0, 0.0, 0.0)) == pytest.approx(28.0)
    # one point per z level and one inside another: (1,1,1) inside (2,3,4) changes nothing
    pts = [(2.0, 3.0, 4.0), (4.0, 2.0, 1.0), (1.0, 1.0, 1.0)]
    assert hypervolume(pts, (0.0, 0.0, 0.0)) == pytest.approx(28.0)


def test_hypervolume_3d_three_boxes_inclusion_exclusion():
    # A=(3,1,1) 3, B=(1,3,1) 3, C=(1,1,3) 3; pairwise overlaps are the unit cube (1 each),
    # the triple overlap too: 9 - 3 + 1 = 7
    pts = [(3.0, 1.0, 1.0), (1.0, 3.0, 1.0), (1.0, 1.0, 3.0)]
    assert hypervolume(pts, (0.0, 0.0, 0.0)) == pytest.approx(7.0)


def _grid_count(points: np.ndarray, n: int, h: float) -> float:
    """Volume of the union of boxes [0, p] estimated by counting n^3 cell centres of size h."""
    centres = (np.arange(n) + 0.5) * h
    x, y, z = np.meshgrid(centres, centres, centres, indexing="ij")
    covered = np.zeros(x.shape, dtype=bool)
    for px, py, pz in points:
        covered |= (x < px) & (y < py) & (z < pz)
    return float(covered.sum()) * h**3


@pytest.mark.parametrize("seed", range(4))
def test_hypervolume_3d_matches_exact_grid_count_on_integer_points(seed):
    # with integer coordinates every unit cell is either fully inside the union or outside it,
    # so counting cell centres is exact
    rng = np.random.default_rng(seed)
    pts = rng.integers(1, 13, size=(6, 3)).astype(float)
    assert hypervolume(pts, (0.0, 0.0, 0.0)) == pytest.approx(_grid_count(pts, 12, 1.0), abs=1e-9)


def test_hypervolume_3d_matches_grid_count_on_random_points():
    rng = np.random.default_rng(123)
    pts = rng.uniform(0.05, 1.0, size=(6, 3))
    n = 100
    h = 1.0 / n
    # cell-centre counting misplaces at most half a cell along each upper face of every box
    a, b, c = pts.T
    tolerance = float(np.sum(a * b + b * c + a * c)) * h / 2
    assert hypervolume(pts, (0.0, 0.0, 0.0)) == pytest.approx(_grid_count(pts, n, h), abs=tolerance)


@pytest.mark.parametrize(
    "points, reference",
    [
        ([(1.0,)], (0.0,)),  # 1-D
        ([(1.0, 1.0, 1.0, 1.0)], (0.0, 0.0, 0.0, 0.0)),  # 4-D
        ([(1.0, 1.0, 1.0)], (0.0, 0.0)),  # point and reference disagree
        ([[(1.0, 1.0)]], (0.0, 0.0)),  # 3-D array of points
        ([(float("nan"), 1.0)], (0.0, 0.0)),
    ],
)
def test_hypervolume_rejects_bad_input(points, reference):
    with pytest.raises(ValueError):
        hypervolume(points, reference)


# --- Pareto front and buffer ------------------------------------------------------------------


def test_dominates_and_pareto_front():
    assert dominates((2, 2), (2, 1))
    assert not dominates((2, 2), (2, 2))
    assert not dominates((3, 1), (1, 3))
    pts = [(1, 3), (3, 1), (2, 2), (1, 1), (3, 1), (3, 0)]
    # (1,1) and (3,0) are dominated, the second (3,1) is a duplicate
    assert pareto_front(pts).tolist() == [[1, 3], [3, 1], [2, 2]]
    assert pareto_front(np.empty((0, 2))).shape == (0, 2)


def test_buffer_adds_non_dominated_points_with_their_contribution():
    buffer = ParetoBuffer((0.0, 0.0))
    assert buffer.add((2.0, 1.0)) == pytest.approx(2.0)  # box 2*1 on an empty buffer
    # (1,3): union 2 + 3 - 1 = 4, so HVC = 4 - 2 = 2
    assert buffer.contribution((1.0, 3.0)) == pytest.approx(2.0)
    assert buffer.add((1.0, 3.0)) == pytest.approx(2.0)
    assert buffer.points == [(2.0, 1.0), (1.0, 3.0)]
    assert buffer.hypervolume() == pytest.approx(4.0)


def test_buffer_rejects_dominated_equal_and_below_reference_points():
    buffer = ParetoBuffer((0.0, 0.0), [(2.0, 1.0), (1.0, 3.0)])
    for point in [(1.0, 1.0), (2.0, 1.0), (5.0, -1.0), (0.0, 9.0)]:
        assert buffer.contribution(point) == 0.0
        assert buffer.add(point) == 0.0
    assert buffer.points == [(2.0, 1.0), (1.0, 3.0)]


def test_buffer_prunes_points_the_new_one_dominates():
    buffer = ParetoBuffer((0.0, 0.0), [(2.0, 1.0), (1.0, 3.0)])  # HV 4
    assert buffer.add((2.5, 3.0)) == pytest.approx(7.5 - 4.0)  # dominates both; box 2.5*3
    assert buffer.points == [(2.5, 3.0)]
    # (3,1) is not dominated: union 7.5 + 3 - 2.5 = 8, HVC 0.5, and (2.5, 3) stays
    assert buffer.add((3.0, 1.0)) == pytest.approx(0.5)
    assert buffer.points == [(2.5, 3.0), (3.0, 1.0)]


def test_buffer_with_3_objectives_and_non_zero_reference():
    buffer = ParetoBuffer((1.0, 1.0, 1.0))
    assert buffer.add((3.0, 2.0, 2.0)) == pytest.approx(2.0)  # 2*1*1
    # (2,3,2): 1*2*1 = 2 with overlap 1*1*1 -> HVC 1
    assert buffer.add((2.0, 3.0, 2.0)) == pytest.approx(1.0)


def test_buffer_state_dict_round_trips_through_json():
    buffer = ParetoBuffer((0.5, -1.0, 0.0), [(1.0, 2.0, 3.0), (2.0, 0.0, 1.0)])
    state = json.loads(json.dumps(buffer.state_dict()))
    assert state == {"reference": [0.5, -1.0, 0.0], "points": [[1.0, 2.0, 3.0], [2.0, 0.0, 1.0]]}
    restored = ParetoBuffer((0.0, 0.0))
    restored.load_state_dict(state)
    assert restored.reference == buffer.reference
    assert restored.points == buffer.points
    assert restored.hypervolume() == pytest.approx(buffer.hypervolume())
    assert ParetoBuffer.from_state_dict(state).points == buffer.points
    with pytest.raises(ValueError, match="missing"):
        restored.load_state_dict({"reference": [0.0, 0.0]})


def test_meta_reward():
    assert meta_reward(0.0) == 0.5
    assert meta_reward(-3.0) == 0.5  # negative HVC is no progress
    assert meta_reward(1.0) == pytest.approx(1.6423912)  # 0.5 + 1.5 * tanh(1)
    assert meta_reward(100.0) == pytest.approx(2.0)
    with pytest.raises(ValueError):
        meta_reward(float("nan"))


def test_orient_negates_minimised_objectives():
    assert orient([1.0, 2.0, 3.0], [False, True, False]).tolist() == [1.0, -2.0, 3.0]
    assert orient([[1, 2], [3, 4]], [True, False]).tolist() == [[-1, 2], [-3, 4]]
    with pytest.raises(ValueError):
        orient([1.0, 2.0], [True])


# --- gradient-based weights -------------------------------------------------------------------


def test_influences_hand_computed():
    # g1=(1,2,0), g2=(3,-1,1); sum=(4,1,1); I1 = 4+2+0 = 6, I2 = 12-1+1 = 12
    grads = torch.tensor([[1.0, 2.0, 0.0], [3.0, -1.0, 1.0]])
    assert influences(grads).tolist() == [6.0, 12.0]
    assert influences(list(grads)).tolist() == [6.0, 12.0]
    assert influences([g.to(torch.bfloat16).reshape(3, 1) for g in grads]).tolist() == [6.0, 12.0]


def test_influences_rejects_bad_input():
    with pytest.raises(ValueError):
        influences([])
    with pytest.raises(ValueError):
        influences([torch.ones(3), torch.ones(4)])
    with pytest.raises(ValueError):
        influences([torch.tensor([float("inf"), 0.0])])


def test_mirror_descent_step_hand_computed():
    # lr/mu = 0.1: logits log(0.5) + (0.6, 1.2) -> e^0.6 / (e^0.6 + e^1.2) = 0.3543437
    new = mirror_descent_step([0.5, 0.5], [6.0, 12.0], lr=1e-6, mu=1e-5)
    assert new == pytest.approx([0.3543437, 0.6456563])
    # lr/mu * I1 = ln 2 doubles w1: (0.5, 0.25, 0.5) / 1.25 = (0.4, 0.2, 0.4)
    new = mirror_descent_step([0.25, 0.25, 0.5], [10 * math.log(2), 0.0, 0.0], lr=0.1, mu=1.0)
    assert new == pytest.approx([0.4, 0.2, 0.4])


def test_mirror_descent_step_moves_weight_to_largest_influence_and_stays_on_simplex():
    w = np.array([0.2, 0.3, 0.5])
    new = mirror_descent_step(w, torch.tensor([1.0, 5.0, -2.0]), lr=1e-6)  # default mu 1e-5
    assert new.sum() == pytest.approx(1.0)
    assert np.all(new > 0)
    assert new[1] > w[1] and new[0] < w[0] and new[2] < w[2]
    # a huge step and a zero weight: still positive, still summing to 1
    extreme = mirror_descent_step([1.0, 0.0, 0.0], [1e6, 0.0, -1e6], lr=1.0, mu=1.0)
    assert np.all(extreme > 0) and extreme.sum() == pytest.approx(1.0)
    assert extreme[0] == pytest.approx(1.0)
    # lr = 0 changes nothing
    assert mirror_descent_step(w, [3.0, 1.0, 2.0], lr=0.0) == pytest.approx(w)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"weights": [0.5, 0.5], "influences": [1.0], "lr": 1e-6, "mu": 1e-5},
        {"weights": [0.5, 0.5], "influences": [1.0, float("nan")], "lr": 1e-6, "mu": 1e-5},
        {"weights": [0.5, 0.5], "influences": [1.0, 0.0], "lr": -1.0, "mu": 1e-5},
        {"weights": [0.5, 0.5], "influences": [1.0, 0.0], "lr": 1e-6, "mu": 0.0},
    ],
)
def test_mirror_descent_step_rejects_bad_input(kwargs):
    with pytest.raises(ValueError):
        mirror_descent_step(**kwargs)


def test_check_weights_normalises():
    assert check_weights([1.0, 3.0]).tolist() == [0.25, 0.75]
    assert check_weights(torch.tensor([2.0, 0.0])).tolist() == [1.0, 0.0]


@pytest.mark.parametrize(
    "weights, message",
    [
        ([], "empty"),
        ([0.5, -0.1], ">= 0"),
        ([float("nan"), 1.0], "finite"),
        ([float("inf"), 1.0], "finite"),
        ([0.0, 0.0], "positive"),
        ([[0.5, 0.5]], "flat"),
    ],
)
def test_check_weights_errors(weights, message):
    with pytest.raises(ValueError, match=message):
        check_weights(weights)


@pytest.mark.parametrize("estimator", ["grpo", "rloo", "reinforce"])
def test_a_factor_on_the_rewards_cancels_in_the_normalised_estimators(estimator):
    """A factor on the rewards (the reference's meta-reward) cancels in GRPO's std division and
    REINFORCE's whitening; rlx's meta-reward scales the learning rate instead
    (tests/test_weighting.py: the parameter change scales with it)."""
    from rlx.algos import pg

    rewards = torch.tensor([[0.0, 1.0, 0.5, 0.2], [1.0, 0.0, 0.3, 0.9]])
    lengths = torch.ones_like(rewards)
    factor = 1.7

    def advantages(r):
        return pg.kept_advantages(
            estimator, r, r[..., None], lengths, [1.0], "sum_then_normalize", True
        )[0]

    base = advantages(rewards)
    on_rewards = advantages(rewards * factor)
    if estimator == "rloo":  # no normalisation: a factor on the rewards already scales it
        assert torch.allclose(on_rewards, base * factor, atol=1e-5)
    else:  # it cancels, up to the eps added to the std (grpo: TRL's 1e-4)
        assert torch.allclose(on_rewards, base, atol=3 * pg.EPS)
    weighting = HypervolumeWeighting([False, False])
    weighting.start([0.2, 0.2])
    metrics = weighting.update([0.6, 0.5])  # HVC = 0.4 * 0.3 = 0.12
    assert metrics["hvc"] == pytest.approx(0.12)
    assert weighting.factor == pytest.approx(0.5 + 1.5 * np.tanh(0.12))
    assert torch.allclose(base * weighting.factor, base * 1.5 * np.tanh(0.12) + base * 0.5)
    assert not torch.allclose(base * weighting.factor, base)


def test_hypervolume_weighting_state_round_trip():
    a = HypervolumeWeighting([False, True])
    a.start([0.1, 40.0])  # the second objective (a length) is minimised: oriented to -40
    a.update([0.3, 30.0])  # better in both: HVC = 0.2 * 10 = 2
    b = HypervolumeWeighting([False, True])
    b.load_state_dict(json.loads(json.dumps(a.state_dict())))
    assert b.factor == a.factor == pytest.approx(0.5 + 1.5 * np.tanh(2.0))
    assert b.update([0.2, 20.0]) == a.update([0.2, 20.0])


# --- adaptive hypervolume weights and the gradient method's state ---------------------------------


def test_hypervolume_direction_hand_computed():
    # gains (0.4, 0.1) of scales (0.8, 0.2) -> u = (0.5, 0.5): equal shares
    assert hypervolume_direction([0.6, 0.3], [0.2, 0.2], [0.8, 0.2]) == pytest.approx([0.5, 0.5])
    # u = (1, 0.25): 1/u = (1, 4) -> (0.2, 0.8), the lagging objective gets most
    assert hypervolume_direction([1.0, 0.25], [0.0, 0.0], [1.0, 1.0]) == pytest.approx([0.2, 0.8])
    # below the reference: floored at GAIN_FLOOR, u = (1, 0.05) -> (1, 20) / 21
    new = hypervolume_direction([1.0, -0.5], [0.0, 0.0], [1.0, 1.0])
    assert new == pytest.approx([1 / 21, 20 / 21]) and GAIN_FLOOR == 0.05


def test_adaptive_hypervolume_weights_move_toward_the_lagging_objective():
    fixed = HypervolumeWeighting([False, True], weights=[2.0, 1.0])
    fixed.start([0.1, 40.0])
    fixed.update([0.5, 38.0])
    assert fixed.weights.tolist() == [2.0, 1.0]  # the reference: weights as configured
    adaptive = HypervolumeWeighting([False, True], weights=[2.0, 1.0], adapt_lr=1.0)
    assert adaptive.weights == pytest.approx([2 / 3, 1 / 3])  # on the simplex
    adaptive.start([0.1, 40.0])
    # first point: each objective's scale is its own gain -> u = (1, 1), equal shares 0.5
    adaptive.update([0.5, 38.0])
    expected = np.array([2 / 3, 1 / 3]) * np.exp([0.5, 0.5])
    assert adaptive.weights == pytest.approx(expected / expected.sum())
    # second: correctness gains 0.1 of its 0.4 scale (u = 0.25), the length its full 2 (u = 1)
    before = adaptive.weights.copy()
    adaptive.update([0.2, 38.0])
    logits = np.log(before) + np.array([0.8, 0.2])
    assert adaptive.weights == pytest.approx(np.exp(logits) / np.exp(logits).sum())
    assert adaptive.weights[0] > before[0]
    restored = HypervolumeWeighting([False, True], weights=[2.0, 1.0], adapt_lr=1.0)
    restored.load_state_dict(json.loads(json.dumps(adaptive.state_dict())))
    assert restored.update([0.7, 30.0]) == adaptive.update([0.7, 30.0])
    assert restored.weights.tolist() == adaptive.weights.tolist()


def test_gradient_weighting_steps_and_keeps_the_weight_of_a_missing_objective():
    w = GradientWeighting([0.2, 0.3, 0.5], mu=1.0)
    assert w.step([1.0, 2.0, 0.5], lr=0.1) == pytest.approx(
        mirror_descent_step([0.2, 0.3, 0.5], [1.0, 2.0, 0.5], lr=0.1, mu=1.0)
    )
    held = GradientWeighting([0.2, 0.3, 0.5], mu=1.0)
    new = held.step([1.0, None, 0.5], lr=0.1)
    assert new[1] == 0.3 and new.sum() == pytest.approx(1.0)
    assert new[[0, 2]] == pytest.approx(
        0.7 * mirror_descent_step([2 / 7, 5 / 7], [1.0, 0.5], 0.1, 1.0)
    )
    assert held.step([None, None, None], lr=0.1).tolist() == new.tolist()
    copy = GradientWeighting([1.0, 1.0, 1.0])
    copy.load_state_dict(json.loads(json.dumps(held.state_dict())))
    assert copy.weights.tolist() == held.weights.tolist()
    with pytest.raises(ValueError, match="3 weights"):
        held.step([1.0, 2.0], lr=0.1)


def test_weighting_png_plots_weight_trajectories(tmp_path):
    """weighting.png: a gradient run gets the weights panel, a hypervolume run also the validation
    points and the meta-reward (three panels: a wider image), a static run none."""
    import matplotlib.pyplot as plt

    from rlx.metrics import plot_weighting

    def plot(name, rows):
        path = tmp_path / f"{name}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        return plot_weighting(path, tmp_path / f"{name}.png")

    assert plot("static", [{"step": 1, "reward_mean": 0.5}]) is None
    weights = [{"step": s, "weight/a": 0.5 + 0.1 * s, "weight/b": 0.5 - 0.1 * s} for s in (1, 2)]
    hv = [
        r | {"val/a": 0.1 * r["step"], "val/b": 0.2, "meta_reward": 0.5, "hypervolume": 0.01}
        for r in weights
    ]
    one, three = plt.imread(plot("gradient", weights)), plt.imread(plot("hv", hv))
    assert one.shape[1] * 2.5 < three.shape[1]
