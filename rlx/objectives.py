"""Dynamic multi-objective reward weighting: hypervolume meta-rewards and gradient-based weights.

Implements the two weighting schemes of "Learning to Optimize Multi-Objective Alignment Through
Dynamic Reward Weighting" (arXiv 2509.11452). With K objectives r_1..r_K and weights w on the
simplex, the scalar training reward is ``r = sum_k w_k r_k``.

Hypervolume-guided (weights fixed, the update scaled by a meta-reward; rlx: the learning rate):
  before training, evaluate on validation prompts; the per-objective means are the reference point
  p_0 and start an empty :class:`ParetoBuffer`. After each later evaluation the new point p_t gets
  ``HVC = HV(buffer + p_t) - HV(buffer)`` (both w.r.t. p_0), the meta-reward is
  ``meta_reward(HVC) = 0.5 + 1.5 * tanh(max(HVC, 0))``, and p_t joins the buffer only when HVC > 0.

Gradient-based (weights move by mirror descent):
  per objective k, g_k is the policy gradient with advantages computed from r_k alone (optionally
  over a subset of layers). ``influences`` gives ``I_k = <g_k, sum_j g_j>`` and
  ``mirror_descent_step`` sets ``w <- softmax(log w + lr * I / mu)``, lr being the policy learning
  rate and ``mu`` the regulariser (the paper's lambda, about 1e-5), optionally with the mean
  influence over several steps (GradientWeighting) and without each objective's self-term.

Adaptive preference weights (an rlx addition; the reference keeps the weights fixed): after each
evaluation, ``w <- softmax(log w + eta * hypervolume_direction(p_t))``, see HypervolumeWeighting.

Conventions: every point / vector of objective values has its K objectives on the last axis and is
in *maximisation* form; use :func:`orient` to negate objectives that are minimised (e.g. completion
length) before handing them to the hypervolume code. Only :func:`influences` needs torch, which it
imports when called.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import torch

WEIGHT_FLOOR = 1e-12
"""Smallest weight mirror_descent_step returns, and the clamp applied before taking log w."""

DEFAULT_MU = 1e-5
"""The paper's lambda (the reference code's regularization_factor): the step is lr * I / mu."""

SUPPORTED_DIMENSIONS = (2, 3)


# --- hypervolume ------------------------------------------------------------------------------


def hypervolume(points: Any, reference: Sequence[float]) -> float:
    """Exact hypervolume of the region dominated by `points` and dominating `reference`.

    Maximisation: the volume of the union of the boxes ``[reference, p]`` over the points.
    `points` is [N, d] (N may be 0) and `reference` [d] with d = 2 or 3. A point that is not
    strictly better than the reference in every objective spans an empty box and adds nothing
    (only the part above the reference counts). 2-D uses a sort-and-sweep, 3-D sums 2-D sweeps over
    slabs along the last axis; both are exact, O(N log N) and O(N^2 log N).

    Raises ValueError for other dimensions, a shape mismatch or non-finite values.
    """
    pts, ref = _as_points(points, reference)
    return _hypervolume_checked(pts, ref)


def _hypervolume_checked(pts: np.ndarray, ref: np.ndarray) -> float:
    """hypervolume() on arrays already validated by _as_points."""
    pts = pts[np.all(pts > ref, axis=1)]  # boxes of the other points are empty
    if len(pts) == 0:
        return 0.0
    if len(ref) == 2:
        return _hypervolume_2d(pts, ref)
    return _hypervolume_3d(pts, ref)


def _hypervolume_2d(pts: np.ndarray, ref: np.ndarray) -> float:
    """Sweep in decreasing x: each point raising the running max y adds a strip of its width."""
    order = np.lexsort((-pts[:, 1], -pts[:, 0]))  # x descending, ties: larger y first
    volume, top = 0.0, float(ref[1])
    for x, y in pts[order]:
        if y > top:
            volume += (float(x) - float(ref[0])) * (float(y) - top)
            top = float(y)
    return volume


def _hypervolume_3d(pts: np.ndarray, ref: np.ndarray) -> float:
    """Slabs between consecutive z levels: slab [z_{i-1}, z_i] holds the points with z >= z_i."""
    volume, below = 0.0, float(ref[2])
    for level in np.unique(pts[:, 2]):  # ascending
        above = pts[pts[:, 2] >= level]
        volume += (float(level) - below) * _hypervolume_2d(above[:, :2], ref[:2])
        below = float(level)
    return volume


def _as_points(points: Any, reference: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """Validate and convert to float64 arrays: points [N, d], reference [d], d in (2, 3)."""
    ref = np.asarray(reference, dtype=np.float64)
    if ref.ndim != 1 or len(ref) not in SUPPORTED_DIMENSIONS:
        raise ValueError(
            f"reference must be a vector of 2 or 3 objectives, got shape {ref.shape}; "
            "hypervolume is implemented exactly for 2 and 3 objectives only"
        )
    pts = np.asarray(points, dtype=np.float64)
    if pts.size == 0:
        pts = pts.reshape(0, len(ref))
    if pts.ndim == 1:
        pts = pts[None, :]
    if pts.ndim != 2 or pts.shape[1] != len(ref):
        raise ValueError(
            f"points must be [N, {len(ref)}] to match the reference {ref.tolist()}, "
            f"got shape {pts.shape}"
        )
    if not np.all(np.isfinite(ref)) or not np.all(np.isfinite(pts)):
        raise ValueError("points and reference must be finite (no NaN or inf)")
    return pts, ref


# --- Pareto front and buffer ------------------------------------------------------------------


def dominates(a: Sequence[float], b: Sequence[float]) -> bool:
    """True when a is at least as good as b in every objective and better in one (maximisation)."""
    a_arr, b_arr = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return bool(np.all(a_arr >= b_arr) and np.any(a_arr > b_arr))


def pareto_front(points: Any) -> np.ndarray:
    """The non-dominated subset of `points` [N, K] (maximisation), in input order, as [M, K].

    Exact duplicates are kept once (their first occurrence). Works for any K >= 1.
    """
    pts = np.asarray(points, dtype=np.float64)
    if pts.size == 0:
        return pts.reshape(0, pts.shape[-1] if pts.ndim == 2 else 0)
    if pts.ndim != 2:
        raise ValueError(f"points must be [N, K], got shape {pts.shape}")
    keep = []
    for i, p in enumerate(pts):
        if any(dominates(q, p) for q in pts):
            continue
        if any(np.array_equal(pts[j], p) for j in keep):
            continue
        keep.append(i)
    return pts[keep]


class ParetoBuffer:
    """Non-dominated evaluation points and the reference they are measured from (maximisation).

    The reference p_0 (the validation means before training) is stored apart and is not one of
    the points: it spans no volume. `add` keeps a point only when its hypervolume contribution is
    positive and then drops any points it dominates, so the buffer is always a Pareto front. The
    hypervolume is the same with or without dominated points, so pruning changes no HVC.

    State for checkpoints: ``state_dict()`` returns ``{"reference": [...], "points": [[...], ...]}``
    of plain floats (JSON-safe); ``load_state_dict`` restores it.
    """

    def __init__(self, reference: Sequence[float], points: Iterable[Sequence[float]] = ()) -> None:
        _, ref = _as_points(np.empty((0, len(reference))), reference)
        self.reference: tuple[float, ...] = tuple(float(x) for x in ref)
        self._points: list[tuple[float, ...]] = []
        for p in points:
            self.add(p)

    @property
    def points(self) -> list[tuple[float, ...]]:
        """The current points, oldest first (a copy)."""
        return list(self._points)

    def __len__(self) -> int:
        return len(self._points)

    def hypervolume(self) -> float:
        """Hypervolume of the current points w.r.t. the reference."""
        return hypervolume(self._points, self.reference)

    def contribution(self, point: Sequence[float]) -> float:
        """HVC: hypervolume(points + [point]) - hypervolume(points), >= 0.

        Exactly 0.0 when the point is weakly dominated by a buffered point or is not strictly
        better than the reference in every objective; positive otherwise.
        """
        new, ref = _as_points([point], self.reference)
        p = new[0]
        if not np.all(p > ref):
            return 0.0
        if any(np.all(np.asarray(q) >= p) for q in self._points):
            return 0.0
        old = np.asarray(self._points, dtype=np.float64).reshape(-1, len(ref))
        with_point = _hypervolume_checked(np.vstack([old, new]), ref)
        return max(with_point - _hypervolume_checked(old, ref), 0.0)

    def add(self, point: Sequence[float]) -> float:
        """Return the point's HVC; add it (pruning points it dominates) only when HVC > 0."""
        hvc = self.contribution(point)
        if hvc > 0.0:
            p = tuple(float(x) for x in point)
            self._points = [q for q in self._points if not dominates(p, q)]
            self._points.append(p)
        return hvc

    def state_dict(self) -> dict[str, list]:
        """{"reference": [d floats], "points": [[d floats], ...]} in plain Python types."""
        return {"reference": list(self.reference), "points": [list(p) for p in self._points]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what state_dict returned; the points are validated and reduced to their front."""
        missing = {"reference", "points"} - set(state)
        if missing:
            raise ValueError(f"ParetoBuffer state is missing {sorted(missing)}")
        ref = state["reference"]
        pts, _ = _as_points(state["points"], ref)
        self.reference = tuple(float(x) for x in ref)
        self._points = [tuple(float(x) for x in p) for p in pareto_front(pts)]

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> ParetoBuffer:
        """A new buffer holding `state`."""
        buffer = cls(state["reference"])
        buffer.load_state_dict(state)
        return buffer

    def __repr__(self) -> str:
        return f"ParetoBuffer(reference={list(self.reference)}, points={self.points})"


def meta_reward(hvc: float) -> float:
    """0.5 + 1.5 * tanh(max(hvc, 0)): 0.5 for no progress, rising to 2.0 for large HVC.

    rlx multiplies the learning rate of the optimizer steps by this factor until the next
    evaluation (1.0 before the first one; HypervolumeWeighting). Raises ValueError for NaN.
    """
    value = float(hvc)
    if math.isnan(value):
        raise ValueError("hvc is NaN")
    return 0.5 + 1.5 * math.tanh(max(value, 0.0))


def orient(values: Any, minimise: Sequence[bool]) -> np.ndarray:
    """Negate the objectives marked True in `minimise`, so that all are maximised.

    `values` is [..., K] (one point or many); `minimise` has K booleans. Returns float64.
    """
    arr = np.asarray(values, dtype=np.float64)
    flags = np.asarray(minimise, dtype=bool)
    if flags.ndim != 1 or arr.ndim == 0 or arr.shape[-1] != len(flags):
        raise ValueError(
            f"minimise has {flags.size} flags but values have shape {arr.shape}; "
            "give one flag per objective (last axis)"
        )
    return np.where(flags, -arr, arr)


# --- gradient-based weights -------------------------------------------------------------------


def influences(
    grads: Sequence[torch.Tensor] | torch.Tensor, self_term: bool = True
) -> torch.Tensor:
    """I_k = <g_k, sum_j g_j> for K per-objective policy gradients; without the self-term
    (`self_term=False`) I_k = <g_k, sum_{j != k} g_j>, the alternative the reference leaves
    commented out (ray_trainer_optimization.py line 915): with few samples |g_k|^2 is mostly
    noise, and it sends weight to the noisiest gradient.

    `grads` is a list of K tensors with D elements each (any shape, flattened) or a [K, D]
    tensor. Low-precision gradients are upcast to float32 for the dot products; no [K, D] copy is
    made of a list. Returns a float64 CPU tensor [K]. Raises ValueError for an empty list,
    mismatched sizes or non-finite results.
    """
    import torch

    rows = list(grads.unbind(0)) if isinstance(grads, torch.Tensor) else list(grads)
    if isinstance(grads, torch.Tensor) and grads.ndim != 2:
        raise ValueError(f"a gradient tensor must be [K, D], got shape {tuple(grads.shape)}")
    if not rows:
        raise ValueError("influences needs at least one gradient")
    sizes = {row.numel() for row in rows}
    if len(sizes) != 1:
        raise ValueError(
            f"gradients must all have the same number of elements, got {sorted(sizes)}"
        )

    def flat(row: torch.Tensor) -> torch.Tensor:
        row = row.detach().reshape(-1)
        return row if row.dtype in (torch.float32, torch.float64) else row.float()

    total = flat(rows[0]).clone()
    for row in rows[1:]:
        total = total + flat(row)
    result = torch.stack([torch.dot(flat(row), total.to(flat(row).dtype)) for row in rows])
    if not self_term:
        result = result - torch.stack([torch.dot(flat(row), flat(row)) for row in rows])
    result = result.to(device="cpu", dtype=torch.float64)
    if not torch.isfinite(result).all():
        raise ValueError(f"influences are not finite: {result.tolist()}")
    return result


def mirror_descent_step(
    weights: Any, influences: Any, lr: float, mu: float = DEFAULT_MU
) -> np.ndarray:
    """One mirror-descent (exponentiated-gradient) step on the simplex.

    ``w_new = softmax(log(max(w, WEIGHT_FLOOR)) + lr * I / mu)``, floored at WEIGHT_FLOOR and
    renormalised, so every weight stays positive and they sum to 1. `weights` and `influences`
    are length-K (lists, arrays or tensors); `lr` is the policy learning rate (>= 0) and `mu` the
    regulariser (> 0; the paper's lambda). Returns a float64 array [K].
    """
    w = check_weights(weights)
    scores = _to_numpy(influences)
    if scores.shape != w.shape:
        raise ValueError(f"got {scores.size} influences for {w.size} weights")
    if not np.all(np.isfinite(scores)):
        raise ValueError(f"influences must be finite, got {scores.tolist()}")
    if not math.isfinite(lr) or lr < 0:
        raise ValueError(f"lr must be a finite number >= 0, got {lr!r}")
    if not math.isfinite(mu) or mu <= 0:
        raise ValueError(f"mu must be a finite number > 0, got {mu!r}")
    logits = np.log(np.maximum(w, WEIGHT_FLOOR)) + (lr / mu) * scores
    logits -= logits.max()
    new = np.exp(logits)
    new /= new.sum()
    new = np.maximum(new, WEIGHT_FLOOR)
    return new / new.sum()


def check_weights(weights: Any) -> np.ndarray:
    """Validate objective weights and return them normalised to the simplex (float64 [K]).

    Raises ValueError when they are empty, not a flat list, non-finite, negative, or do not sum
    to a positive number.
    """
    w = _to_numpy(weights)
    if w.ndim != 1:
        raise ValueError(f"weights must be a flat list of numbers, got shape {w.shape}")
    if w.size == 0:
        raise ValueError("weights are empty; give one weight per objective")
    if not np.all(np.isfinite(w)):
        raise ValueError(f"weights must be finite, got {w.tolist()}")
    if np.any(w < 0):
        raise ValueError(f"weights must be >= 0, got {w.tolist()}")
    total = float(w.sum())
    if total <= 0:
        raise ValueError(f"weights must sum to a positive number, got {w.tolist()}")
    return w / total


def _to_numpy(values: Any) -> np.ndarray:
    """A float64 array from a list, array or (any-device) tensor."""
    if hasattr(values, "detach"):
        values = values.detach().cpu().double().numpy()
    return np.asarray(values, dtype=np.float64)


GAIN_FLOOR = 0.05
"""hypervolume_direction: a normalised gain below this counts as this (an objective at or below
its reference point then gets a large but finite share)."""


def hypervolume_direction(
    point: Sequence[float], reference: Sequence[float], scale: Sequence[float]
) -> np.ndarray:
    """The direction on the simplex in which improving `point` grows its hypervolume fastest.

    Each objective's gain over the reference is measured in its own unit, the largest distance
    from the reference seen so far: u_k = (p_k - r_k) / scale_k, floored at GAIN_FLOOR. The box
    [r, p] then has volume V = prod_k u_k, and its relative gradient d log V / d u_k = 1 / u_k
    says how much volume one unit of objective k adds, relative to the volume already held. The
    result is that gradient normalised to sum 1: the objectives that lag get most of it.
    Maximisation form (orient first); returns float64 [K].
    """
    p, r = np.asarray(point, dtype=np.float64), np.asarray(reference, dtype=np.float64)
    s = np.maximum(np.asarray(scale, dtype=np.float64), 1e-12)
    if not (p.shape == r.shape == s.shape) or p.ndim != 1:
        raise ValueError(f"point, reference and scale must be [K], got {p.shape}, {r.shape}")
    gains = np.maximum((p - r) / s, GAIN_FLOOR)  # [K]
    direction = 1.0 / gains
    return direction / direction.sum()


class HypervolumeWeighting:
    """The hypervolume-guided meta-reward of a training run (weighting.method=hypervolume).

    `start(p0)` takes the validation point of the model before training (one mean per objective)
    as the reference point and the first buffer entry; each later `update(p_t)` adds p_t's
    hypervolume contribution and sets `factor` = meta_reward(HVC) for the following steps. The
    loop multiplies the learning rate of those steps' optimizer updates by `factor`
    (rlx/weighting.py). Not the rewards, as the reference does: a constant factor there cancels in
    GRPO's std division and REINFORCE's whitening; not the advantages: gradient clipping and
    Adam's normalisation by the gradient's running scale absorb a constant factor (all of it on
    the first step). A learning-rate factor scales the parameter change itself.

    `weights` are the preference weights of the rewards. They stay as given (the reference code)
    unless `adapt_lr` > 0: then they start on the simplex and each update takes a mirror-descent
    step ``w <- softmax(log w + adapt_lr * hypervolume_direction(p_t))`` toward the objectives in
    which p_t gains least over the reference, the ones whose improvement grows the hypervolume
    most (docs/pg.md).
    """

    def __init__(
        self,
        minimise: Sequence[bool],
        weights: Sequence[float] | None = None,
        adapt_lr: float = 0.0,
    ):
        if not math.isfinite(adapt_lr) or adapt_lr < 0:
            raise ValueError(f"adapt_lr must be a finite number >= 0, got {adapt_lr!r}")
        self.minimise = list(minimise)
        self.adapt_lr = float(adapt_lr)
        raw = np.ones(len(self.minimise)) if weights is None else _to_numpy(weights)
        self.weights = check_weights(raw) if adapt_lr > 0 else raw
        self.buffer: ParetoBuffer | None = None
        self.scale = np.zeros(len(self.minimise))  # largest |p_t - p_0| so far, per objective
        self.factor = 1.0

    def start(self, point: Sequence[float]) -> None:
        self.buffer = ParetoBuffer(orient(point, self.minimise))

    def update(self, point: Sequence[float]) -> dict:
        """Add a validation point; returns its metrics (hvc, hypervolume, meta_reward)."""
        oriented = orient(point, self.minimise)
        hvc = self.buffer.add(oriented)
        self.factor = meta_reward(hvc)
        if self.adapt_lr > 0:
            reference = np.asarray(self.buffer.reference)
            self.scale = np.maximum(self.scale, np.abs(oriented - reference))
            direction = hypervolume_direction(oriented, reference, self.scale)
            logits = np.log(np.maximum(self.weights, WEIGHT_FLOOR)) + self.adapt_lr * direction
            self.weights = check_weights(np.exp(logits - logits.max()))
        return {"hvc": hvc, "hypervolume": self.buffer.hypervolume(), "meta_reward": self.factor}

    def state_dict(self) -> dict:
        return {
            "factor": self.factor,
            "buffer": self.buffer.state_dict() if self.buffer is not None else None,
            "weights": self.weights.tolist(),
            "scale": self.scale.tolist(),
        }

    def load_state_dict(self, state: dict) -> None:
        self.factor = float(state["factor"])
        if state["buffer"] is not None:
            self.buffer = ParetoBuffer.from_state_dict(state["buffer"])
        if "weights" in state:  # absent in checkpoints written before adaptive weights
            self.weights = np.asarray(state["weights"], dtype=np.float64)
            self.scale = np.asarray(state["scale"], dtype=np.float64)


class GradientWeighting:
    """The gradient-based weights of a training run (weighting.method=gradient).

    `step(influences, lr)` adds the step's influences I_k (influences()); every
    `accumulation_steps`-th call the weights take one mirror-descent step (mirror_descent_step)
    with each objective's mean influence over those calls, at the lr of that call: the
    reference's weight_accumulation_steps (dynamic-reward-weighting,
    verl/trainer/ppo/ray_trainer_optimization.py lines 916-932). An objective whose influence is
    None (it returned None for every sample of the step: no gradient) adds nothing; one with no
    influence in the whole window keeps its weight, and the others share the rest of the mass,
    moved by the step restricted to them.
    """

    def __init__(
        self, weights: Sequence[float], mu: float = DEFAULT_MU, accumulation_steps: int = 1
    ):
        if accumulation_steps < 1:
            raise ValueError(f"accumulation_steps must be >= 1, got {accumulation_steps!r}")
        self.weights = check_weights(weights)
        self.mu = float(mu)
        self.accumulation_steps = int(accumulation_steps)
        self.pending = np.zeros(len(self.weights))  # influences summed since the last move
        self.counts = np.zeros(len(self.weights), dtype=np.int64)  # steps each one was given
        self.calls = 0  # steps since the last move

    def step(self, influences: Sequence[float | None], lr: float) -> np.ndarray:
        if len(influences) != len(self.weights):
            raise ValueError(f"got {len(influences)} influences for {len(self.weights)} weights")
        for k, value in enumerate(influences):
            if value is not None:
                self.pending[k] += float(value)
                self.counts[k] += 1
        self.calls += 1
        if self.calls < self.accumulation_steps:
            return self.weights
        present = self.counts > 0
        mass = float(self.weights[present].sum())
        if mass > 0:
            scores = self.pending[present] / self.counts[present]
            moved = mirror_descent_step(self.weights[present] / mass, scores, lr, self.mu)
            self.weights = self.weights.copy()
            self.weights[present] = mass * moved
        self.pending[:], self.counts[:], self.calls = 0.0, 0, 0
        return self.weights

    def state_dict(self) -> dict:
        return {
            "weights": self.weights.tolist(),
            "pending": self.pending.tolist(),
            "counts": self.counts.tolist(),
            "calls": self.calls,
        }

    def load_state_dict(self, state: dict) -> None:
        self.weights = np.asarray(state["weights"], dtype=np.float64)
        if "pending" in state:  # absent in checkpoints written before accumulation
            self.pending = np.asarray(state["pending"], dtype=np.float64)
            self.counts = np.asarray(state["counts"], dtype=np.int64)
            self.calls = int(state["calls"])
