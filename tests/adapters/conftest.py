"""Fixtures of the adapter tests: a tiny policy and a mini training loop that calls the hooks
the PG loop calls (rlx.adapters.install_step_hooks, extra_loss)."""

from __future__ import annotations

import pytest
import torch


def lm_loss(model, ids: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy from the logits (no labels: the model adds nothing of its own)."""
    logits = model(input_ids=ids).logits[:, :-1]  # [B, T-1, V]
    return torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1)
    )


def train_steps(model, cfg, steps: int, lr: float = 1e-2, seed: int = 0):
    """`steps` AdamW steps on random tokens, hooks and extra loss as the PG loop uses them."""
    from rlx.adapters import extra_loss, install_step_hooks

    gen = torch.Generator().manual_seed(seed)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=lr, fused=True)
    hooks = install_step_hooks(model, optimizer, cfg)
    vocab = (
        model.config.vocab_size
        if not hasattr(model, "peft_config")
        else model.get_base_model().config.vocab_size
    )
    for _ in range(steps):
        ids = torch.randint(3, vocab, (2, 12), generator=gen)
        loss = lm_loss(model, ids) + extra_loss(model)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    hooks.remove()
    return hooks


@pytest.fixture
def policy(tiny_llama):
    """load_policy(tiny_llama, adapter config) -> the model."""
    from rlx.config import ModelConfig
    from rlx.policy import load_policy

    def make(cfg, total_steps=None):
        torch.manual_seed(0)
        model, _ = load_policy(ModelConfig(name=tiny_llama), cfg, total_steps=total_steps)
        return model

    return make


@pytest.fixture
def train():
    """train_steps(model, adapter_cfg, steps, lr=1e-2) -> the StepHooks used."""
    return train_steps
