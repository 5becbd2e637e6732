"""The off-principal guard (`adapter.principal_guard=k`): no update of a target matrix may touch
the top-k principal subspaces of its starting weight W0.

After every optimizer step, per matrix, dW <- (I - U_k U_k^T) dW (I - V_k V_k^T) with U_k [O, k],
V_k [I, k] the top-k singular vectors of W0, taken once when the guard is built. Projecting the
gradient instead is not enough: AdamW's moments and decoupled weight decay move the weight along
directions the projected gradient never had. It runs as an optimizer step post-hook, so a loop
needs only `install_step_hooks` (rlx.adapters). With `adapter.guard_gradient` the gradients are
projected the same way before the step as well (a pre-hook): the post-step projection alone leaves
AdamW's moments full of principal directions that it throws away every step.

What "the update" is:
- full fine-tuning: dW = W - W0. The guard keeps no copy of W0, only its projections
  U_k^T W0 [k, I], W0 V_k [O, k] and U_k^T W0 V_k [k, k]: with R(D) = U U^T D + D V V^T -
  U U^T D V V^T (the part removed), W <- W - R(W) + R(W0), and R(W0) is built from those three.
- adapters whose merged update is a product, delta = c B A (LoRA, minor, MiCA; AdaLoRA's
  B (E * A), E scaling A's rows): B <- (I - U_k U_k^T) B and A <- A (I - V_k V_k^T), so
  c B' A' = (I - U U^T) c B A (I - V V^T) exactly. The minor init starts at B0 A0 in the minor
  directions (orthogonal to U_k, V_k), which the projection keeps, so its update
  c (B A - B0 A0) is projected the same way. DoRA, MiSS and PiSSA have no such product
  (AdapterConfig refuses the guard with them).
U_k, V_k come from the weight the forward pass starts from (the adapter merged in), in float64 and
stored in float32 (exactly orthonormal columns matter: a projector that is not idempotent leaks).
"""

from __future__ import annotations

import torch

from rlx.adapters.merge import effective_weights, is_adapted, tuner_layers
from rlx.config import ConfigError


def top_singular_vectors(weight: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """U_k [O, k], V_k [I, k]: the top-k singular vectors of weight [O, I], in float64."""
    u, _, vh = torch.linalg.svd(weight.double(), full_matrices=False)
    return u[:, :k], vh[:k].T


def target_matrix_names(model, target_modules) -> list[str]:
    """HF names ("model.layers.0.mlp.up_proj.weight") of the 2-D weights of every Linear whose
    last name part is in `target_modules`; under PEFT, those of the adapted layers."""
    if is_adapted(model):
        candidates = tuner_layers(model.get_base_model())
    else:
        candidates = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    return [f"{n}.weight" for n in candidates if n.rsplit(".", 1)[-1] in target_modules]


class _FullMatrix:
    """Full fine-tuning: the weight itself and W0's projections."""

    def __init__(self, name: str, weight: torch.nn.Parameter, w0: torch.Tensor, k: int):
        if weight.dtype != torch.float32:  # W - R(dW) written back in bf16 rounds R back in
            raise ConfigError(
                f"principal guard: {name} is {str(weight.dtype).removeprefix('torch.')}; the "
                "full fine-tuning guard needs fp32 weights: set model.dtype=float32"
            )
        u, v = top_singular_vectors(w0, k)
        w0 = w0.double()
        self.weight, self.u, self.v = weight, u.float(), v.float()
        self.ut_w0 = (u.T @ w0).float()  # [k, I]
        self.w0_v = (w0 @ v).float()  # [O, k]
        self.ut_w0_v = (u.T @ w0 @ v).float()  # [k, k]

    def follow_device(self) -> None:
        if self.u.device != self.weight.device:  # the model moved (accelerate): follow it once
            dev = self.weight.device
            self.u, self.v = self.u.to(dev), self.v.to(dev)
            self.ut_w0, self.w0_v, self.ut_w0_v = (
                t.to(dev) for t in (self.ut_w0, self.w0_v, self.ut_w0_v)
            )

    def project_gradient(self) -> None:
        """G <- G - R(G): the gradient of W without its principal part."""
        grad = self.weight.grad
        if grad is None:
            return
        self.follow_device()
        u, v = self.u, self.v
        ut_g = u.T @ grad  # [k, I]
        g_v = grad @ v  # [O, k]
        grad.sub_(u @ ut_g + (g_v - u @ (ut_g @ v)) @ v.T)

    def project(self) -> None:
        self.follow_device()
        w, u, v = self.weight.float(), self.u, self.v  # [O, I] [O, k] [I, k]
        w_v = w @ v  # [O, k]
        d_left = u.T @ w - self.ut_w0  # U^T dW [k, I]
        d_right = w_v - self.w0_v  # dW V [O, k]
        d_both = u.T @ w_v - self.ut_w0_v  # U^T dW V [k, k]
        removed = u @ d_left + (d_right - u @ d_both) @ v.T  # R(dW) [O, I]
        self.weight.copy_(w - removed)


class _Factors:
    """A product adapter: B [O, r] and A [r, I] of one layer."""

    def __init__(self, lora_b: torch.Tensor, lora_a: torch.Tensor, w0: torch.Tensor, k: int):
        u, v = top_singular_vectors(w0, k)
        self.b, self.a, self.u, self.v = lora_b, lora_a, u.float(), v.float()

    def follow_device(self) -> None:
        if self.u.device != self.b.device:  # the model moved (accelerate): follow it once
            self.u, self.v = self.u.to(self.b.device), self.v.to(self.a.device)

    def project_gradient(self) -> None:
        """The factors' gradients projected as the factors are (dB's columns off U_k, dA's rows
        off V_k): AdamW's moments, built from them, then hold no principal direction."""
        self.follow_device()
        if self.b.grad is not None:
            self.b.grad.sub_(self.u @ (self.u.T @ self.b.grad))
        if self.a.grad is not None:
            self.a.grad.sub_((self.a.grad @ self.v) @ self.v.T)

    def project(self) -> None:
        self.follow_device()
        u, v = self.u, self.v  # [O, k] [I, k]
        self.b.sub_(u @ (u.T @ self.b))
        self.a.sub_((self.a @ v) @ v.T)


def _factor(holder, adapter: str) -> torch.Tensor:
    """lora_A[adapter] is an nn.Linear (LoRA) or a Parameter (AdaLoRA)."""
    item = holder[adapter]
    return item.weight if isinstance(item, torch.nn.Module) else item


class PrincipalGuard:
    """Keeps every target matrix's update out of W0's top-k principal subspaces (module doc)."""

    def __init__(self, model, k: int, target_modules):
        names = target_matrix_names(model, target_modules)
        if not names:
            raise ValueError(f"principal guard: no matrix matches {list(target_modules)}")
        self.k, self.entries = k, []
        base = model.get_base_model() if is_adapted(model) else model
        layers = tuner_layers(base) if is_adapted(model) else {}
        params = dict(base.named_parameters())
        with torch.no_grad():
            for name, w0 in effective_weights(model, names):
                w0 = w0.detach().to("cpu", torch.float64)
                module_name = name.removesuffix(".weight")
                if module_name not in layers:
                    self.entries.append(_FullMatrix(name, params[name], w0, k))
                    continue
                layer = layers[module_name]
                for adapter in layer.lora_A:
                    b, a = _factor(layer.lora_B, adapter), _factor(layer.lora_A, adapter)
                    self.entries.append(_Factors(b, a, w0, k))
        self.names = names

    @torch.no_grad()
    def apply(self) -> None:
        for entry in self.entries:
            entry.project()

    @torch.no_grad()
    def project_gradients(self) -> None:
        """Before the optimizer step (adapter.guard_gradient): the same projection on the
        gradients, so that AdamW's first moment proposes no principal direction and its second
        moment holds no principal gradient energy (which would shrink the off-principal steps).
        The step's own projection still follows: Adam's element-wise normalisation and weight
        decay move a weight along directions its gradient did not have."""
        for entry in self.entries:
            entry.project_gradient()

    def step_hook(self, optimizer, args, kwargs) -> None:
        """torch.optim.Optimizer.register_step_post_hook signature."""
        self.apply()
