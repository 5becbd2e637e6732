"""EGGROLL ("Evolution Strategies at the Hyperscale", 2025): seeded low-rank noise, fitness shaping,
and the fitness-weighted update, as pure functions of seeds and fitness scalars.

Noise. For an evolved matrix W [out, in] named `name` and population member i, one standard normal
block Z [(in + out), r] is drawn from a generator seeded by hash(run seed, name, epoch // noise_reuse,
i // 2) (noise_reuse 0 = the same noise every epoch); B = Z[:in], A = Z[in:] * s_i sigma / sqrt(r)
with s_i = +1 for even i and -1 for odd i (antithetic pairs share a draw). The perturbation is
E_i = A_i B_i^T, held as rlx.lowrank.LowRank(A_i, B_i): the one low-rank update type the
adapter layer, the population kernel and every ES backend share; nothing is ever stored. The name
enters the key, so two parameters of one shape never share noise (a bug other ES ports shipped).
`kind="full_rank"` draws E_i = s_i sigma Z with Z of W's shape instead: the plain ES baseline
(Qiu et al. 2025).

Fitness shaping (`SHAPERS`, selected by name), from a [members, prompts] score matrix (NaN where a
member did not answer a prompt; raw fitness = a member's mean score):
  zscore        (f - mean f) / sqrt(var f + 1e-5)
  group_zscore  each prompt's scores centred over the members that answered it, divided by the
                global std of all scores, then averaged per member (the reference's group-wise
                centring with a global std; a prompt's answers form the group)
  pair_sign     +-sign(f_2k - f_2k+1) for the antithetic pair (2k, 2k+1)
  none          raw fitness (for tests of the estimator's scale)

Update and the learning-rate / sigma convention (written down and tested). With eps_i = E_i / sigma
(unit-variance entries: for the low-rank noise E[vec eps vec eps^T] = I at every rank),

    step_direction = (1/N) sum_i f~_i eps_i = (1 / (N sigma)) sum_i f~_i E_i

and the torch optimizer (SGD by default) is handed grad = -step_direction, so plain SGD moves
W <- W + lr * step_direction. With raw fitness, E[step_direction] = sigma * grad J_sigma(W) (the
gradient of the Gaussian-smoothed objective): lr plays the role of the learning rate times sigma.
Deviation from the reference: it hands the optimizer -sqrt(N) * (1/N) sum f~_i E_i, i.e.
lr_reference = lr_here / (sigma * sqrt(N)); ours keeps lr independent of N and sigma's scale and
matches Qiu et al.'s lr 5e-4 at sigma 1e-3.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch

from rlx.config.choices import NOISE_KINDS
from rlx.lowrank import LowRank, merged, stack

FITNESS_EPS = 1e-5  # added to the variance in the z-scores, as in the reference


@dataclass(frozen=True)
class NoiseSpec:
    """Everything the noise of a run depends on, besides (parameter name, epoch, member)."""

    seed: int
    sigma: float
    rank: int = 1
    noise_reuse: int = 1  # epochs sharing one noise draw; 0 = one draw for the whole run
    kind: str = "low_rank"

    def __post_init__(self) -> None:
        if self.kind not in NOISE_KINDS:
            raise ValueError(f"noise kind must be one of {NOISE_KINDS}, got {self.kind!r}")
        if self.rank < 1 or self.sigma <= 0 or self.noise_reuse < 0:
            raise ValueError(f"need rank >= 1, sigma > 0, noise_reuse >= 0; got {self}")


def noise_epoch(spec: NoiseSpec, epoch: int) -> int:
    """epoch // noise_reuse (0 when noise_reuse is 0: one draw for the whole run)."""
    return 0 if spec.noise_reuse == 0 else epoch // spec.noise_reuse


def noise_key(spec: NoiseSpec, name: str, epoch: int, member: int) -> int:
    """The 63-bit generator seed of (run seed, parameter name, epoch // noise_reuse, member // 2);
    a hash, not Python's hash(), so every process derives the same key."""
    text = f"{spec.seed}|{name}|{noise_epoch(spec, epoch)}|{member // 2}".encode()
    return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "little") >> 1


def member_sign(member: int) -> float:
    """+1 for even members, -1 for odd ones: member 2k+1 is the mirror image of member 2k."""
    return 1.0 if member % 2 == 0 else -1.0


def _draw(spec: NoiseSpec, name: str, epoch: int, member: int, shape) -> torch.Tensor:
    gen = torch.Generator().manual_seed(noise_key(spec, name, epoch, member))
    return torch.randn(shape, generator=gen, dtype=torch.float32)


def low_rank_noise(
    spec: NoiseSpec, name: str, shape: Sequence[int], epoch: int, member: int
) -> LowRank:
    """One member's E = A B^T: LowRank(A [out, r], sign and sigma/sqrt(r) folded in, B [in, r])."""
    out_dim, in_dim = shape
    z = _draw(spec, name, epoch, member, (in_dim + out_dim, spec.rank))  # [in+out, r]
    scale = member_sign(member) * spec.sigma / math.sqrt(spec.rank)
    return LowRank(z[in_dim:] * scale, z[:in_dim])


def population_noise(
    spec: NoiseSpec, name: str, shape: Sequence[int], epoch: int, members: Sequence[int]
) -> LowRank:
    """The noise of several members, stacked: A [M, out, r], B [M, in, r]."""
    return stack([low_rank_noise(spec, name, shape, epoch, m) for m in members])


def noise_adapter(
    spec: NoiseSpec, shapes: Mapping[str, Sequence[int]], epoch: int, member: int
) -> dict[str, LowRank]:
    """HF module name -> one member's noise, for every evolved matrix of `shapes`
    ("...q_proj.weight" -> [out, in]): the member as an adapter (rlx/lowrank.py)."""
    return {
        name.removesuffix(".weight"): low_rank_noise(spec, name, shape, epoch, member)
        for name, shape in shapes.items()
    }


def population_adapter(
    spec: NoiseSpec, shapes: Mapping[str, Sequence[int]], epoch: int, members: Sequence[int]
) -> dict[str, LowRank]:
    """HF module name -> the stacked noise of `members`, for every evolved matrix of `shapes`."""
    return {
        name.removesuffix(".weight"): population_noise(spec, name, shape, epoch, members)
        for name, shape in shapes.items()
    }


def perturbation(
    spec: NoiseSpec, name: str, shape: Sequence[int], epoch: int, member: int
) -> torch.Tensor:
    """The dense perturbation E [out, in] of one member (A B^T, or full-rank noise)."""
    if spec.kind == "full_rank":
        return _draw(spec, name, epoch, member, tuple(shape)) * (member_sign(member) * spec.sigma)
    return low_rank_noise(spec, name, shape, epoch, member).delta()


def perturbed_weight(
    spec: NoiseSpec, name: str, weight: torch.Tensor, epoch: int, member: int
) -> torch.Tensor:
    """W + E_member [out, in] (a new tensor): low-rank noise merged by rlx.lowrank."""
    if spec.kind == "full_rank":
        return weight + perturbation(spec, name, weight.shape, epoch, member)
    return merged(weight, low_rank_noise(spec, name, weight.shape, epoch, member))


def step_direction(
    spec: NoiseSpec, name: str, shape: Sequence[int], epoch: int, shaped: torch.Tensor
) -> torch.Tensor:
    """(1 / (N sigma)) sum_i f~_i E_i [out, in] for members 0..N-1 with shaped fitness [N].

    Low rank: the stacked noise's `weighted_sum`, one contraction over (member, rank) that never
    materialises an E_i; the result has rank up to N*r. Antithetic pairs are drawn once and their
    two fitnesses folded into one weight: (f~_2k - f~_2k+1) E_2k."""
    n = shaped.numel()
    shaped = shaped.to(torch.float64)
    pair_weight = shaped[0::2].clone()
    pair_weight[: n // 2] -= shaped[1::2]  # the odd member's E is -E of the even one
    firsts = range(0, n, 2)
    if spec.kind == "full_rank":
        total = torch.zeros(tuple(shape), dtype=torch.float64)
        for w, m in zip(pair_weight.tolist(), firsts, strict=True):
            total += w * perturbation(spec, name, shape, epoch, m).double()
    else:
        total = population_noise(spec, name, shape, epoch, list(firsts)).weighted_sum(pair_weight)
    return (total / (n * spec.sigma)).to(torch.float32)


# ----------------------------------------------------------------------------- fitness shaping


def member_fitness(scores: torch.Tensor) -> torch.Tensor:
    """Raw fitness [N]: each member's mean over the prompts it answered (NaN entries skipped)."""
    return scores.nanmean(dim=1)


def zscore(scores: torch.Tensor) -> torch.Tensor:
    """(f - mean f) / sqrt(var f + 1e-5) over members (population variance)."""
    f = member_fitness(scores)
    return (f - f.mean()) / torch.sqrt(f.var(unbiased=False) + FITNESS_EPS)


def group_zscore(scores: torch.Tensor) -> torch.Tensor:
    """Centre each prompt's column over the members that answered it, divide by the std of all
    answered scores, then average per member."""
    answered = ~torch.isnan(scores)
    values = scores[answered]
    std = torch.sqrt(values.var(unbiased=False) + FITNESS_EPS)
    centred = (scores - scores.nanmean(dim=0, keepdim=True)) / std  # [N, P]
    return centred.nanmean(dim=1)


def pair_sign(scores: torch.Tensor) -> torch.Tensor:
    """+sign(f_2k - f_2k+1) for member 2k and the opposite for member 2k+1 (0 on ties)."""
    f = member_fitness(scores)
    if f.numel() % 2:
        raise ValueError("pair_sign needs an even population (antithetic pairs)")
    sign = torch.sign(f[0::2] - f[1::2])
    return torch.stack([sign, -sign], dim=1).reshape(-1)


def no_shaping(scores: torch.Tensor) -> torch.Tensor:
    """Raw fitness, unshaped."""
    return member_fitness(scores)


def fitness_snr(scores: torch.Tensor) -> float:
    """How much of a step's fitness differences the noise's sign explains, from its antithetic
    pairs: (var d + 1e-5) / (var s + 1e-5), with d = f_2k - f_2k+1 and s = f_2k + f_2k+1 per pair
    and f a member's mean score after centring each prompt over the members that answered it.

    Near W, f(W +- E) = f(W) +- g.E + noise (+ curvature): d carries twice the signal g.E plus
    noise, s only noise and curvature. So 1 means the sign of the noise does not matter (the step
    is a random walk), and the further above 1, the more of the update is signal. A step whose
    members all tie gives 1."""
    if scores.shape[0] % 2:
        raise ValueError("fitness_snr needs an even population (antithetic pairs)")
    scores = scores.to(torch.float64)
    f = (scores - scores.nanmean(dim=0, keepdim=True)).nanmean(dim=1)  # [N]
    d, s = f[0::2] - f[1::2], f[0::2] + f[1::2]
    return float((d.var(unbiased=False) + FITNESS_EPS) / (s.var(unbiased=False) + FITNESS_EPS))


SHAPERS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "zscore": zscore,
    "group_zscore": group_zscore,
    "pair_sign": pair_sign,
    "none": no_shaping,
}


def shape_fitness(name: str, scores: torch.Tensor) -> torch.Tensor:
    """Shaped fitness [N] from a [N, P] score matrix (float64 for a stable, exact reduction)."""
    if name not in SHAPERS:
        raise ValueError(f"unknown fitness shaping {name!r}: choose one of {sorted(SHAPERS)}")
    if scores.dim() != 2:
        raise ValueError(f"scores must be [members, prompts], got shape {tuple(scores.shape)}")
    return SHAPERS[name](scores.to(torch.float64))


# ----------------------------------------------------------------------------- the update


def evolved_parameters(model: torch.nn.Module, target_modules: Sequence[str]) -> dict:
    """name -> weight Parameter of every nn.Linear whose module name ends with one of
    `target_modules` ("all-linear" = every nn.Linear). A tied lm_head is refused: the linear-layer
    perturbation would not reach its twin, the input embedding."""
    out = {}
    tied = getattr(getattr(model, "config", None), "tie_word_embeddings", False)
    everything = "all-linear" in target_modules
    for mod_name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear):
            continue
        last = mod_name.rsplit(".", 1)[-1]
        if not (everything or last in target_modules or mod_name in target_modules):
            continue
        if tied and module.weight is getattr(model.get_input_embeddings(), "weight", None):
            if everything:
                continue
            raise ValueError(f"{mod_name} is tied to the input embedding: it cannot be evolved")
        out[f"{mod_name}.weight"] = module.weight
    if not out:
        raise ValueError(f"no nn.Linear of the model matches target_modules={list(target_modules)}")
    return out


def set_es_gradients(
    spec: NoiseSpec, params: Mapping[str, torch.Tensor], epoch: int, shaped: torch.Tensor
) -> float:
    """Write -step_direction into each parameter's .grad (the optimizer then ascends the fitness);
    return the global L2 norm of the step direction."""
    sq = 0.0
    for name, p in params.items():
        direction = step_direction(spec, name, p.shape, epoch, shaped)
        p.grad = (-direction).to(p.dtype)
        sq += float(direction.double().pow(2).sum())
    return math.sqrt(sq)


def make_optimizer(name: str, params, lr: float, momentum: float = 0.0, weight_decay: float = 0.0):
    """SGD (the reference's choice) or Adam over the evolved parameters."""
    params = list(params)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    raise ValueError(f"unknown ES optimizer {name!r}: choose 'sgd' or 'adam'")
