"""EGGROLL math (rlx/algos/eggroll.py): seeded noise, fitness shaping, the update and its scale,
convergence on small objectives, and the low-rank update approaching full-rank ES as rank grows."""

from __future__ import annotations

import math

import pytest
import torch

from rlx.algos import eggroll as eg

SHAPE = (6, 5)  # [out, in]


def spec(**kw) -> eg.NoiseSpec:
    return eg.NoiseSpec(**({"seed": 3, "sigma": 0.1, "rank": 2, "noise_reuse": 1} | kw))


def test_noise_regenerates_identically_and_stacks():
    s = spec()
    e1 = eg.low_rank_noise(s, "layer.w", SHAPE, epoch=4, member=7)
    e2 = eg.low_rank_noise(s, "layer.w", SHAPE, epoch=4, member=7)
    a1, b1 = e1.u, e1.v
    assert torch.equal(a1, e2.u) and torch.equal(b1, e2.v) and e1.scale == 1.0
    assert a1.shape == (6, 2) and b1.shape == (5, 2)
    pop = eg.population_noise(s, "layer.w", SHAPE, 4, [6, 7])
    assert torch.equal(pop.u[1], a1) and torch.equal(pop.v[1], b1)
    assert torch.equal(eg.perturbation(s, "layer.w", SHAPE, 4, 7), a1 @ b1.T)


def test_same_shape_parameters_get_different_noise():
    """The bug other ports shipped: one seed for every tensor gives same-shaped layers equal noise."""
    s = spec()
    e_q = eg.perturbation(s, "layers.0.q_proj.weight", SHAPE, 0, 0)
    e_k = eg.perturbation(s, "layers.0.k_proj.weight", SHAPE, 0, 0)
    e_q1 = eg.perturbation(s, "layers.1.q_proj.weight", SHAPE, 0, 0)
    assert not torch.allclose(e_q, e_k) and not torch.allclose(e_q, e_q1)
    full = spec(kind="full_rank")
    assert not torch.allclose(
        eg.perturbation(full, "a", SHAPE, 0, 0), eg.perturbation(full, "b", SHAPE, 0, 0)
    )


def test_noise_key_depends_on_seed_epoch_reuse_and_pair():
    s = spec()
    key = eg.noise_key
    assert key(s, "w", 0, 0) == key(s, "w", 0, 1)  # antithetic pair: one draw
    assert key(s, "w", 0, 0) != key(s, "w", 0, 2)
    assert key(s, "w", 0, 0) != key(s, "w", 1, 0)  # noise_reuse 1: new noise each epoch
    assert key(s, "w", 0, 0) != key(spec(seed=4), "w", 0, 0)
    reuse2 = spec(noise_reuse=2)
    assert key(reuse2, "w", 2, 0) == key(reuse2, "w", 3, 0) != key(reuse2, "w", 4, 0)
    forever = spec(noise_reuse=0)
    assert key(forever, "w", 0, 5) == key(forever, "w", 99, 5)
    assert 0 <= key(s, "w", 0, 0) < 2**63


def test_antithetic_pairs_cancel():
    for s in (spec(), spec(kind="full_rank")):
        e0 = eg.perturbation(s, "w", SHAPE, 2, 4)
        e1 = eg.perturbation(s, "w", SHAPE, 2, 5)
        assert torch.equal(e0 + e1, torch.zeros(SHAPE))
        # equal fitness within each pair: the pair's contributions cancel exactly
        flat = torch.tensor([0.3, 0.3, -1.0, -1.0], dtype=torch.float64)
        assert torch.equal(eg.step_direction(s, "w", SHAPE, 2, flat), torch.zeros(SHAPE))


@pytest.mark.parametrize("rank", [1, 4])
def test_perturbation_entries_have_std_sigma(rank):
    s = spec(sigma=0.01, rank=rank)
    e = torch.stack([eg.perturbation(s, "w", (64, 64), 0, m) for m in range(0, 40, 2)])
    assert abs(float(e.std()) / 0.01 - 1) < 0.1


def test_step_direction_matches_explicit_sum():
    """(1/(N sigma)) sum_i f_i E_i with every E_i materialised, for both noise kinds."""
    f = torch.tensor([0.5, -1.0, 2.0, 0.25, -0.3, 0.0], dtype=torch.float64)
    for s in (spec(), spec(kind="full_rank"), spec(rank=3, sigma=0.02)):
        explicit = sum(
            float(f[i]) * eg.perturbation(s, "w", SHAPE, 1, i).double() for i in range(6)
        )
        expected = explicit / (6 * s.sigma)
        got = eg.step_direction(s, "w", SHAPE, 1, f)
        assert torch.allclose(got.double(), expected, rtol=1e-5, atol=1e-6)


def test_update_rank_grows_with_population():
    """The sum of N rank-1 perturbations has rank min(N/2, dims): a high-rank step (pairs share E)."""
    s = spec(rank=1)
    f = torch.randn(16, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    g = eg.step_direction(s, "w", (20, 20), 0, f)
    assert int(torch.linalg.matrix_rank(g)) == 8


# ----------------------------------------------------------------------------- fitness shaping


def test_zscore_hand_computed():
    scores = torch.tensor([[1.0, 3.0], [2.0, 2.0], [0.0, 0.0], [5.0, 1.0]], dtype=torch.float64)
    f = torch.tensor([2.0, 2.0, 0.0, 3.0], dtype=torch.float64)  # row means
    expected = (f - 1.75) / math.sqrt(1.1875 + 1e-5)  # population variance of f is 1.1875
    assert torch.allclose(eg.shape_fitness("zscore", scores), expected)


def test_group_zscore_centres_each_prompt_with_global_std():
    nan = float("nan")
    # grouped layout: members 0-1 answered prompt 0, members 2-3 prompt 1
    scores = torch.tensor([[1.0, nan], [0.0, nan], [nan, 10.0], [nan, 8.0]], dtype=torch.float64)
    std = math.sqrt(torch.tensor([1.0, 0.0, 10.0, 8.0]).var(unbiased=False).item() + 1e-5)
    expected = torch.tensor([0.5, -0.5, 1.0, -1.0], dtype=torch.float64) / std
    assert torch.allclose(eg.shape_fitness("group_zscore", scores), expected)
    # the easy prompt does not make its members look better than the hard prompt's best member
    assert eg.shape_fitness("group_zscore", scores)[0] > eg.shape_fitness("group_zscore", scores)[3]


def test_pair_sign_and_no_shaping():
    scores = torch.tensor([[1.0], [0.0], [0.2], [0.7], [0.5], [0.5]], dtype=torch.float64)
    assert eg.shape_fitness("pair_sign", scores).tolist() == [1.0, -1.0, -1.0, 1.0, 0.0, -0.0]
    assert torch.equal(eg.shape_fitness("none", scores), scores[:, 0])
    with pytest.raises(ValueError, match="unknown fitness shaping"):
        eg.shape_fitness("rank", scores)


def test_fitness_snr_hand_computed_and_its_two_ends():
    nan = float("nan")
    # grouped: members 0-3 answered prompt 0 (+10 harder to miss), members 4-7 prompt 1
    scores = torch.tensor([[1.0, nan], [0.0, nan], [1.0, nan], [1.0, nan],
                           [nan, 11.0], [nan, 10.0], [nan, 10.0], [nan, 10.0]])  # fmt: skip
    f = torch.tensor([0.25, -0.75, 0.25, 0.25, 0.75, -0.25, -0.25, -0.25], dtype=torch.float64)
    d, s = f[0::2] - f[1::2], f[0::2] + f[1::2]  # the prompt's +10 is centred away
    expected = (d.var(unbiased=False) + 1e-5) / (s.var(unbiased=False) + 1e-5)
    assert eg.fitness_snr(scores) == pytest.approx(float(expected))
    # only the noise's sign matters: far above 1; it does not matter at all: below 1; ties: 1
    odd = torch.tensor([[1.0], [0.0], [0.0], [1.0], [1.0], [0.0], [0.0], [1.0]])
    even = torch.tensor([[1.0], [1.0], [0.0], [0.0], [1.0], [1.0], [0.0], [0.0]])
    assert eg.fitness_snr(odd) > 1e4
    assert eg.fitness_snr(even) < 1e-4
    assert eg.fitness_snr(torch.zeros(8, 2)) == 1.0
    with pytest.raises(ValueError, match="even population"):
        eg.fitness_snr(torch.zeros(3, 1))


def test_shaped_fitness_of_all_equal_scores_is_zero():
    scores = torch.full((4, 3), 0.7, dtype=torch.float64)
    for name in ("zscore", "group_zscore", "pair_sign"):
        assert torch.equal(eg.shape_fitness(name, scores), torch.zeros(4, dtype=torch.float64))


# ----------------------------------------------------------------------------- the update's scale


def es_direction(s: eg.NoiseSpec, fitness_fn, w: torch.Tensor, n: int, shaping: str, epoch=0):
    """step_direction for population n with fitness f_i = fitness_fn(w + E_i)."""
    f = torch.tensor(
        [fitness_fn(w + eg.perturbation(s, "w", w.shape, epoch, i)) for i in range(n)],
        dtype=torch.float64,
    )
    return eg.step_direction(s, "w", w.shape, epoch, eg.shape_fitness(shaping, f[:, None]))


@pytest.mark.parametrize("kind,rank", [("low_rank", 1), ("low_rank", 4), ("full_rank", 1)])
def test_convention_direction_over_sigma_estimates_the_gradient(kind, rank):
    """With raw fitness, E[step_direction] = sigma * grad: on f(W) = <C, W> it must give sigma * C."""
    s = eg.NoiseSpec(seed=0, sigma=0.05, rank=rank, kind=kind)
    c = torch.randn(4, 3, generator=torch.Generator().manual_seed(1))
    estimate = es_direction(s, lambda w: float((c * w).sum()), torch.zeros(4, 3), 6000, "none")
    ratio = estimate / s.sigma
    cosine = float((ratio * c).sum() / (ratio.norm() * c.norm()))
    assert cosine > 0.98 and abs(float(ratio.norm() / c.norm()) - 1) < 0.1


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_es_converges_on_a_quadratic(optimizer):
    """Maximise -||W - W*||^2 with z-scored fitness through a torch optimizer."""
    target = torch.randn(8, 8, generator=torch.Generator().manual_seed(2))
    w = torch.nn.Parameter(torch.zeros(8, 8), requires_grad=False)
    s = eg.NoiseSpec(seed=5, sigma=0.05, rank=1)
    lr = 0.1 if optimizer == "sgd" else 0.05
    opt = eg.make_optimizer(optimizer, [w], lr=lr)
    start = float((w - target).norm())
    for epoch in range(150):
        f = torch.tensor(
            [
                -float((w + eg.perturbation(s, "w", w.shape, epoch, i) - target).pow(2).sum())
                for i in range(32)
            ],
            dtype=torch.float64,
        )
        norm = eg.set_es_gradients(s, {"w": w}, epoch, eg.shape_fitness("zscore", f[:, None]))
        assert norm > 0
        opt.step()
    assert float((w - target).norm()) < 0.15 * start


def test_linear_regression_converges():
    """Fit y = X w* by ES on the negative squared error (a [1, d] weight matrix)."""
    gen = torch.Generator().manual_seed(3)
    x, w_true = torch.randn(64, 6, generator=gen), torch.randn(1, 6, generator=gen)
    y = x @ w_true.T
    w = torch.nn.Parameter(torch.zeros(1, 6), requires_grad=False)
    s = eg.NoiseSpec(seed=1, sigma=0.02, rank=1)
    opt = eg.make_optimizer("sgd", [w], lr=0.05)
    for epoch in range(200):
        f = torch.tensor(
            [
                -float((x @ (w + eg.perturbation(s, "w", w.shape, epoch, i)).T - y).pow(2).mean())
                for i in range(16)
            ],
            dtype=torch.float64,
        )
        eg.set_es_gradients(s, {"w": w}, epoch, eg.shape_fitness("zscore", f[:, None]))
        opt.step()
    assert float((w - w_true).norm()) < 0.1 * float(w_true.norm())


def test_low_rank_update_approaches_full_rank_as_rank_grows():
    """Paper: the low-rank update converges to the full-rank ES update at rate O(1/r). On
    f(W) = sum sin(W) with sigma = 1 the gap is the noise's excess kurtosis, 6/r, times a third
    derivative: it must shrink with r roughly like 1/r."""
    w = torch.linspace(-1.5, 1.5, 9).reshape(3, 3)

    def expected_direction(kind: str, rank: int) -> torch.Tensor:
        s = eg.NoiseSpec(seed=11, sigma=1.0, rank=rank, kind=kind)
        n = 12000
        if kind == "low_rank":  # vectorised fitness for speed; the noise is the real one
            noise = eg.population_noise(s, "w", w.shape, 0, list(range(n)))
            f = torch.sin(w + noise.delta()).sum(dim=(1, 2)).double()
        else:
            f = torch.tensor(
                [
                    float(torch.sin(w + eg.perturbation(s, "w", w.shape, 0, i)).sum())
                    for i in range(n)
                ],
                dtype=torch.float64,
            )
        return eg.step_direction(s, "w", w.shape, 0, f)

    full = expected_direction("full_rank", 1)
    gaps = {r: float((expected_direction("low_rank", r) - full).norm()) for r in (1, 4, 16)}
    assert gaps[1] > 2 * gaps[4] > 0 and gaps[4] > gaps[16]
    assert gaps[1] / gaps[16] > 4


def test_evolved_parameters_pick_linear_weights_only(tiny_llama, tiny_tied):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama)
    names = eg.evolved_parameters(model, ["q_proj", "down_proj"])
    assert sorted(names) == [
        f"model.layers.{i}.{m}.weight"
        for i in (0, 1)
        for m in ("mlp.down_proj", "self_attn.q_proj")
    ]
    every = eg.evolved_parameters(model, ["all-linear"])
    assert "lm_head.weight" in every and len(every) == 15  # 7 per layer + untied head
    assert not any("norm" in n or "embed" in n for n in every)
    with pytest.raises(ValueError, match="no nn.Linear"):
        eg.evolved_parameters(model, ["mlp"])
    tied = AutoModelForCausalLM.from_pretrained(tiny_tied)
    assert "lm_head.weight" not in eg.evolved_parameters(tied, ["all-linear"])
    with pytest.raises(ValueError, match="tied"):
        eg.evolved_parameters(tied, ["lm_head"])
