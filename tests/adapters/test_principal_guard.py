"""adapter.principal_guard: after 3 AdamW steps no target matrix's update has a component in the
top-k principal subspaces of its starting weight, for full fine-tuning and the product adapters."""

from __future__ import annotations

import pytest
import torch

from rlx.adapters import effective_weights
from rlx.adapters.guard import target_matrix_names
from rlx.config import AdaLoraConfig, AdapterConfig

K = 4


def updates(model, names: list[str]) -> dict[str, torch.Tensor]:
    """Per matrix, in float64: the weight (full fine-tuning) or the adapter's merged delta, from
    its factors (c B A; AdaLoRA c B (E * A) / ranknum), so fp32 rounding of W0 + delta stays out."""
    if not hasattr(model, "peft_config"):
        return {n: w.double() for n, w in effective_weights(model, names)}
    layers = dict(model.get_base_model().named_modules())
    out = {}
    for name in names:
        layer = layers[name.removesuffix(".weight")]
        a, b = layer.lora_A["default"], layer.lora_B["default"]
        a = (a.weight if isinstance(a, torch.nn.Module) else a).double()
        b = (b.weight if isinstance(b, torch.nn.Module) else b).double()
        scale = layer.scaling["default"]
        if hasattr(layer, "lora_E"):
            a = a * layer.lora_E["default"].double()
            scale = scale / (float(layer.ranknum["default"]) + 1e-5)
        out[name] = scale * b @ a  # [O, I]
    return out


def principal_leaks(w0s, before, after, k: int) -> dict[str, float]:
    """Per matrix: the worst of ||U^T dW V||, ||U^T dW||, ||dW V|| over ||dW||, dW = after -
    before, U, V: the top k singular vectors of W0."""
    out = {}
    for name, w0 in w0s.items():
        u, _, vh = torch.linalg.svd(w0.double(), full_matrices=False)
        u, v = u[:, :k], vh[:k].T
        dw = after[name] - before[name]
        norm = torch.linalg.matrix_norm(dw)
        assert norm > 1e-6, f"{name} did not train"
        parts = (u.T @ dw @ v, u.T @ dw, dw @ v)
        out[name] = max(float(torch.linalg.matrix_norm(p) / norm) for p in parts)
    return out


def guarded_run(model, cfg, names, train) -> dict[str, float]:
    w0s = {n: w.clone() for n, w in effective_weights(model, names)}
    before = updates(model, names)
    train(model, cfg, steps=3, lr=1e-2)
    return principal_leaks(w0s, before, updates(model, names), K)


@pytest.mark.parametrize("method", ["none", "lora", "minor", "mica", "adalora"])
def test_guard_keeps_updates_off_the_principal_subspaces(method, policy, train):
    cfg = AdapterConfig(
        method=method, rank=4, alpha=8.0, principal_guard=K, adalora=AdaLoraConfig(target_rank=2)
    )
    model = policy(cfg, total_steps=10)  # adalora: no rank pruned to 0 within the 3 steps
    names = target_matrix_names(model, cfg.target_modules)
    assert len(names) == 14  # 7 projections x 2 layers
    leaks = guarded_run(model, cfg, names, train)
    assert max(leaks.values()) < 1e-6, leaks


def test_without_the_guard_updates_do_touch_the_principal_subspaces(policy, train):
    cfg = AdapterConfig(method="none")
    model = policy(cfg)
    names = target_matrix_names(model, cfg.target_modules)
    assert min(guarded_run(model, cfg, names, train).values()) > 1e-3


def test_guard_leaves_untargeted_weights_alone(policy, train):
    cfg = AdapterConfig(method="none", principal_guard=K, target_modules=["q_proj"])
    model = policy(cfg)
    names = target_matrix_names(model, ["q_proj", "k_proj"])
    leaks = guarded_run(model, cfg, names, train)
    assert all(leaks[n] < 1e-6 for n in names if "q_proj" in n)
    assert all(leaks[n] > 1e-3 for n in names if "k_proj" in n)


def test_guard_hooks_through_an_accelerate_prepared_optimizer(policy):
    """The PG loop installs the hooks after accelerator.prepare: the wrapper is unwrapped."""
    from accelerate import Accelerator

    from rlx.adapters import install_step_hooks

    cfg = AdapterConfig(method="none", principal_guard=K)
    model = policy(cfg)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model, optimizer = Accelerator(cpu=True).prepare(model, optimizer)
    hooks = install_step_hooks(model, optimizer, cfg)
    names = target_matrix_names(model, cfg.target_modules)
    w0s = {n: w.clone() for n, w in effective_weights(model, names)}
    ids = torch.randint(3, 100, (2, 8))
    for _ in range(2):
        model(input_ids=ids).logits.logsumexp(-1).mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    assert hooks.step == 2
    after = {n: w.double() for n, w in effective_weights(model, names)}
    leaks = principal_leaks(w0s, {n: w.double() for n, w in w0s.items()}, after, K)
    assert max(leaks.values()) < 1e-6


def test_guard_refuses_bf16_weights_for_full_fine_tuning(tiny_llama):
    """The full fine-tuning guard writes W - R(dW) back in the stored dtype: in bf16 most of the
    principal part it removes rounds back in. One line at config time, naming the fix, and the
    guard itself refuses a bf16 matrix (a caller that skips PGConfig)."""
    from rlx.adapters import install_step_hooks
    from rlx.config import ConfigError, ModelConfig, PGConfig, load_config
    from rlx.policy import load_policy

    bf16 = ["model.dtype=bfloat16", f"adapter.principal_guard={K}"]
    with pytest.raises(ConfigError, match="set model.dtype=float32") as err:
        load_config(PGConfig, overrides=bf16)
    assert "\n" not in str(err.value)
    load_config(PGConfig, overrides=["model.dtype=bfloat16"])  # no guard: nothing to lose
    load_config(PGConfig, overrides=[*bf16[1:], "model.dtype=float32"])
    cfg = AdapterConfig(method="none", principal_guard=K)
    model, _ = load_policy(ModelConfig(name=tiny_llama, dtype="bfloat16"), cfg)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    with pytest.raises(ConfigError, match="model.layers.0.self_attn.q_proj.weight is bfloat16"):
        install_step_hooks(model, optimizer, cfg)


def test_guard_keeps_fp32_factors_on_a_bf16_base(tiny_llama, train):
    """Adapters are accepted with a bf16 base: PEFT keeps their factors in fp32, so the guard's
    projection of B and A stays exact there."""
    from rlx.config import ModelConfig, PGConfig, load_config
    from rlx.policy import load_policy

    overrides = ["model.dtype=bfloat16", "adapter.method=lora", f"adapter.principal_guard={K}"]
    load_config(PGConfig, overrides=overrides)
    cfg = AdapterConfig(method="lora", rank=4, alpha=8.0, principal_guard=K)
    model, _ = load_policy(ModelConfig(name=tiny_llama, dtype="bfloat16"), cfg)
    names = target_matrix_names(model, cfg.target_modules)
    assert max(guarded_run(model, cfg, names, train).values()) < 1e-6
