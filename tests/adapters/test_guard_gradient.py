"""adapter.guard_gradient: the principal guard also projects each gradient before the optimizer
step, so AdamW's first moment holds no principal direction (without it, the moment keeps
proposing principal directions the after-step projection throws away)."""

from __future__ import annotations

import pytest
import torch

from rlx.adapters import install_step_hooks
from rlx.adapters.guard import PrincipalGuard
from rlx.config import AdapterConfig, ConfigError

K = 4


def lm_loss(model, ids: torch.Tensor) -> torch.Tensor:
    logits = model(input_ids=ids).logits[:, :-1]  # [B, T-1, V]
    return torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1)
    )


def principal_moment_share(model, cfg: AdapterConfig, steps: int = 3) -> float:
    """The largest share, over the guarded matrices, of AdamW's first moment that lies in the
    top-k principal subspaces: ||U^T m|| / ||m|| for full weights and B, ||m V|| / ||m|| for A."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-2, fused=True)
    hooks = install_step_hooks(model, optimizer, cfg)
    guard: PrincipalGuard = hooks.guard
    gen = torch.Generator().manual_seed(0)
    vocab = model.get_base_model().config.vocab_size if cfg.enabled else model.config.vocab_size
    for _ in range(steps):
        lm_loss(model, torch.randint(3, vocab, (2, 12), generator=gen)).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    hooks.remove()
    shares = []
    for entry in guard.entries:
        u, v = entry.u.double(), entry.v.double()
        if cfg.enabled:  # LoRA: B's columns against U_k, A's rows against V_k
            m_b = optimizer.state[entry.b]["exp_avg"].double()
            m_a = optimizer.state[entry.a]["exp_avg"].double()
            shares.append(float((u.T @ m_b).norm() / m_b.norm()))
            shares.append(float((m_a @ v).norm() / m_a.norm()))
        else:  # full fine-tuning: the principal part U U^T M + M V V^T - U U^T M V V^T
            m = optimizer.state[entry.weight]["exp_avg"].double()
            removed = u @ (u.T @ m) + (m @ v - u @ (u.T @ m @ v)) @ v.T
            shares.append(float(removed.norm() / m.norm()))
    return max(shares)


@pytest.mark.parametrize("method", [pytest.param("none", marks=pytest.mark.slow), "lora"])
def test_projected_gradients_leave_adams_first_moment_off_the_principals(method, policy):
    on = AdapterConfig(method=method, rank=4, alpha=8.0, principal_guard=K, guard_gradient=True)
    off = AdapterConfig(method=method, rank=4, alpha=8.0, principal_guard=K)
    assert principal_moment_share(policy(on), on) < 1e-6
    assert principal_moment_share(policy(off), off) > 1e-3  # the after-step guard alone


def test_guard_gradient_needs_the_guard():
    with pytest.raises(ConfigError, match="principal_guard"):
        AdapterConfig(method="lora", guard_gradient=True)
