"""Cheap spectral diagnostics a training loop can log every few steps (`adapter.diagnostics_every`).

A SpectralProbe keeps, for a few matrices spread over the layers and layer types, the starting
weight W0 and its top-k singular vectors (one SVD each, when built). `metrics(model)` then costs a
few matrix products per matrix: the mean update alignment, principal share and bf16 sparsity
(definitions in rlx/adapters/diagnostics.py), as `diag/*` metrics.
"""

from __future__ import annotations

import torch

from rlx.adapters.diagnostics import principal_share, update_alignment
from rlx.adapters.diff import weight_delta
from rlx.adapters.guard import target_matrix_names, top_singular_vectors
from rlx.adapters.merge import effective_weights


def spread(names: list[str], count: int) -> list[str]:
    """`count` names evenly spaced over the list (all of them when there are fewer)."""
    if count >= len(names):
        return list(names)
    step = (len(names) - 1) / max(count - 1, 1)
    return [names[round(i * step)] for i in range(count)]


class SpectralProbe:
    """W0 and U_k, V_k of a few target matrices; `metrics(model)` compares the model against them.
    Build it before any training step (and before a resume loads trained weights)."""

    def __init__(self, model, target_modules, top_k: int = 16, matrices: int = 4):
        self.names = spread(target_matrix_names(model, target_modules), matrices)
        self.start = {}
        with torch.no_grad():
            for name, w0 in effective_weights(model, self.names):
                w0 = w0.detach().float().clone()
                u, v = top_singular_vectors(w0, min(top_k, *w0.shape))
                self.start[name] = (w0, u.to(w0), v.to(w0))

    @torch.no_grad()
    def metrics(self, model) -> dict[str, float]:
        """{"diag/alignment", "diag/principal_share", "diag/bf16_sparsity"}: means over the
        probed matrices (alignment and share are nan while dW is 0)."""
        align, share, sparse = [], [], []
        for name, wt in effective_weights(model, self.names):
            w0, u, v = self.start[name]
            wt = wt.to(w0)
            dw = weight_delta(w0, wt)  # [O, I]
            align.append(update_alignment(dw, u, v))
            share.append(principal_share(dw, u, v))
            sparse.append(float((weight_delta(w0, wt, torch.bfloat16) == 0).float().mean()))
        n = len(self.names)
        return {
            "diag/alignment": sum(align) / n,
            "diag/principal_share": sum(share) / n,
            "diag/bf16_sparsity": sum(sparse) / n,
        }
