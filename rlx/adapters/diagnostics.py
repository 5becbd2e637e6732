"""Spectral diagnostics of a weight update (W0 -> Wt), after "The Path Not Taken: RLVR Provably
Learns Off the Principals" (2025; no public code, definitions here are ours where it is vague).

Per matrix W0, Wt [O, I], dW = Wt - W0 (rlx.adapters.diff), U_k, S_k, V_k W0's top-k SVD:
- bf16_sparsity: share of entries with bf16(Wt) == bf16(W0) (the update vanishes at bf16).
- update mask: the entries bf16(Wt) != bf16(W0); its density rho = 1 - bf16_sparsity.
- principal_overlap: share of the update mask inside the principal mask, the rho*O*I entries of
  largest |U_k S_k V_k^T|; low_magnitude_overlap: inside the rho*O*I entries of smallest |W0|.
  A mask drawn at random overlaps either by rho (reported as update_density to compare with).
- spectral_drift: ||s(Wt) - s(W0)|| / ||s(W0)|| over all singular values.
- rotation_deg: the largest principal angle between the top-k left singular subspaces of W0 and
  Wt, and between the right ones (the max of the two), in degrees.
- alignment: ||U_k U_k^T dW V_k V_k^T|| / ||dW|| (Frobenius), the share of dW in the doubly
  principal block; a random dW gives about k / sqrt(O I).
- principal_share: ||dW - (I - U U^T) dW (I - V V^T)|| / ||dW||, the part of dW that touches a
  principal direction on either side: what adapter.principal_guard removes (0 under the guard).
Per layer type (q_proj, ..., down_proj) the mean over layers.
"""

from __future__ import annotations

import math
from collections import defaultdict

import torch

from rlx.adapters.diff import weight_delta

METRICS = (
    "bf16_sparsity",
    "update_density",
    "principal_overlap",
    "low_magnitude_overlap",
    "spectral_drift",
    "rotation_deg",
    "alignment",
    "principal_share",
)


def bf16_update_mask(w0: torch.Tensor, wt: torch.Tensor) -> torch.Tensor:
    """[O, I] True where the update survives bf16 rounding."""
    return weight_delta(w0, wt, torch.bfloat16) != 0


def top_entries_mask(scores: torch.Tensor, count: int, largest: bool = True) -> torch.Tensor:
    """[O, I] True on the `count` entries of largest (or smallest) score."""
    mask = torch.zeros(scores.numel(), dtype=torch.bool, device=scores.device)
    if count > 0:
        idx = torch.topk(scores.reshape(-1), count, largest=largest).indices
        mask[idx] = True
    return mask.view_as(scores)


def mask_overlap(update: torch.Tensor, other: torch.Tensor) -> float:
    """|update & other| / |update| (nan for an empty update mask)."""
    n = int(update.sum())
    return float((update & other).sum()) / n if n else math.nan


def principal_mask(u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor, k: int, count: int):
    """The `count` entries of largest magnitude in W0's rank-k reconstruction U_k S_k V_k^T."""
    recon = (u[:, :k] * s[:k]) @ vh[:k]  # [O, I]
    return top_entries_mask(recon.abs(), count)


def spectral_drift(s0: torch.Tensor, st: torch.Tensor) -> float:
    """Relative change of the singular values, ||st - s0|| / ||s0||."""
    return float(torch.linalg.vector_norm(st - s0) / torch.linalg.vector_norm(s0))


def principal_angles(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Principal angles (radians, ascending) between the column spans of orthonormal a, b."""
    cos = torch.linalg.svdvals(a.T @ b).clamp(-1.0, 1.0)
    return torch.arccos(cos).flip(0)


def subspace_rotation_deg(svd0, svdt, k: int) -> float:
    """Largest principal angle in degrees between the top-k left subspaces of W0 and Wt, and
    between the right ones (svd0, svdt: (U, S, Vh) of each)."""
    (u0, _, vh0), (ut, _, vht) = svd0, svdt
    left = principal_angles(u0[:, :k], ut[:, :k]).max()
    right = principal_angles(vh0[:k].T, vht[:k].T).max()
    return math.degrees(float(torch.maximum(left, right)))


def update_alignment(dw: torch.Tensor, u_k: torch.Tensor, v_k: torch.Tensor) -> float:
    """||U_k U_k^T dW V_k V_k^T|| / ||dW|| (nan for dW = 0)."""
    norm = float(torch.linalg.matrix_norm(dw))
    inside = float(torch.linalg.matrix_norm(u_k.T @ dw @ v_k))  # U_k, V_k orthonormal
    return inside / norm if norm > 0 else math.nan


def principal_share(dw: torch.Tensor, u_k: torch.Tensor, v_k: torch.Tensor) -> float:
    """||dW - (I - U U^T) dW (I - V V^T)|| / ||dW||: what the principal guard removes."""
    norm = float(torch.linalg.matrix_norm(dw))
    if norm == 0:
        return math.nan
    left = dw - u_k @ (u_k.T @ dw)
    kept = left - (left @ v_k) @ v_k.T
    return float(torch.linalg.matrix_norm(dw - kept)) / norm


def matrix_diagnostics(w0: torch.Tensor, wt: torch.Tensor, k: int) -> dict[str, float]:
    """Every metric of the module docstring for one matrix pair [O, I] (float64 SVDs)."""
    w0d, wtd = w0.double(), wt.double()
    k = min(k, *w0.shape)
    svd0 = torch.linalg.svd(w0d, full_matrices=False)
    svdt = torch.linalg.svd(wtd, full_matrices=False)
    u, s, vh = svd0
    dw = wtd - w0d
    update = bf16_update_mask(w0, wt)
    count = int(update.sum())
    return {
        "bf16_sparsity": 1.0 - count / update.numel(),
        "update_density": count / update.numel(),
        "principal_overlap": mask_overlap(update, principal_mask(u, s, vh, k, count)),
        "low_magnitude_overlap": mask_overlap(
            update, top_entries_mask(w0d.abs(), count, largest=False)
        ),
        "spectral_drift": spectral_drift(s, svdt[1]),
        "rotation_deg": subspace_rotation_deg(svd0, svdt, k),
        "alignment": update_alignment(dw, u[:, :k], vh[:k].T),
        "principal_share": principal_share(dw, u[:, :k], vh[:k].T),
    }


def layer_type(name: str) -> str:
    """The module's last name part: model.layers.3.self_attn.q_proj.weight -> q_proj."""
    return name.removesuffix(".weight").rsplit(".", 1)[-1]


def layer_index(name: str) -> int:
    """The decoder layer: model.layers.3.self_attn.q_proj.weight -> 3 (-1 outside the layers)."""
    parts = name.split(".")
    for a, b in zip(parts, parts[1:], strict=False):
        if a == "layers" and b.isdigit():
            return int(b)
    return -1


def summarize(rows: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
    """{layer type: mean of each metric over its matrices} plus "all" (nan values skipped)."""
    groups: dict[str, list[dict]] = defaultdict(list)
    for name, row in rows.items():
        groups[layer_type(name)].append(row)
        groups["all"].append(row)
    out = {}
    for group, members in groups.items():
        out[group] = {}
        for metric in METRICS:
            values = [r[metric] for r in members if not math.isnan(r[metric])]
            out[group][metric] = sum(values) / len(values) if values else math.nan
    return out
