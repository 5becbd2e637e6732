"""The one low-rank update type: dW = scale * U V^T per matrix, keyed by HF module name.

    LowRank(u [..., out, r], v [..., in, r], scale)      # a leading [M] dim stacks M updates

Who uses it: EGGROLL's noise (rlx/algos/eggroll.py: member i's perturbation E_i = A_i B_i^T is
LowRank(A_i, B_i), sign and sigma folded into A_i), its fitness-weighted update
(`weighted_sum`), the population forward (rlx/kernels/population_linear.py takes `factors()`),
the vllm_lora ES backend (one PEFT adapter folder per member: `save_peft_adapter`), the inplace
backend (`merged`), and a trained PEFT LoRA read back as plain tensors (`from_peft_model`). No
PEFT module is built on the ES path: PEFT's format is written and read here as tensors + JSON.

PEFT's convention, for the conversion: delta = (lora_alpha / r) * lora_B @ lora_A with
lora_B [out, r] = U and lora_A [r, in] = V^T (alpha / sqrt(r) under use_rslora).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

PEFT_PREFIX = "base_model.model."  # how PEFT's save_pretrained names a causal LM's modules


@dataclass(frozen=True)
class LowRank:
    """dW = scale * u @ v^T; u [..., out, r], v [..., in, r] (a leading [M] dim: M updates)."""

    u: torch.Tensor
    v: torch.Tensor
    scale: float = 1.0

    def __post_init__(self) -> None:
        u, v = self.u, self.v
        if u.dim() < 2 or u.dim() != v.dim() or u.shape[:-2] != v.shape[:-2]:
            raise ValueError(f"LowRank: u {tuple(u.shape)} and v {tuple(v.shape)} do not pair")
        if u.shape[-1] != v.shape[-1]:
            raise ValueError(f"LowRank: u rank {u.shape[-1]} != v rank {v.shape[-1]}")

    @property
    def rank(self) -> int:
        return self.u.shape[-1]

    @property
    def shape(self) -> tuple[int, ...]:
        """The shape of `delta()`: [..., out, in]."""
        return (*self.u.shape[:-1], self.v.shape[-2])

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(scale * u, v): the scale folded into u (u itself when scale is 1)."""
        return (self.u if self.scale == 1.0 else self.u * self.scale), self.v

    def delta(self) -> torch.Tensor:
        """The dense update [..., out, in]."""
        u, v = self.factors()
        return u @ v.transpose(-1, -2)

    def member(self, i: int) -> LowRank:
        """Update i of a stack."""
        return LowRank(self.u[i], self.v[i], self.scale)

    def weighted_sum(self, weights: torch.Tensor) -> torch.Tensor:
        """sum_m weights[m] * delta_m [out, in] over a stack [M] in float64, never materialising a
        delta_m: one contraction over (member, rank); the result has rank up to M * r."""
        u = self.u.double() * weights.to(torch.float64)[:, None, None]  # [M, out, r]
        total = torch.einsum("mor,mir->oi", u, self.v.double())  # [out, in]
        return total if self.scale == 1.0 else total * self.scale


def stack(updates: list[LowRank]) -> LowRank:
    """Several updates of one matrix as one LowRank with a leading [M] dim (one common scale)."""
    scales = {d.scale for d in updates}
    if len(scales) != 1:
        raise ValueError(f"stack: the updates have different scales {sorted(scales)}")
    return LowRank(
        torch.stack([d.u for d in updates]), torch.stack([d.v for d in updates]), scales.pop()
    )


def merged(weight: torch.Tensor, update: LowRank) -> torch.Tensor:
    """W + dW as a new tensor in W's dtype (W itself untouched)."""
    return weight + update.delta().to(weight.dtype)


@torch.no_grad()
def merge_(weight: torch.Tensor, update: LowRank) -> torch.Tensor:
    """W += dW in place (W's dtype; dW computed in the factors' dtype); returns W."""
    return weight.add_(update.delta().to(weight.device, weight.dtype))


# ----------------------------------------------------------------------------- PEFT's format


def peft_state_dict(updates: Mapping[str, LowRank]) -> dict[str, torch.Tensor]:
    """PEFT LoRA tensors (lora_alpha = r: the scale is folded into lora_B) of module name ->
    update, named as PEFT's save_pretrained names them."""
    tensors = {}
    for module, update in updates.items():
        u, v = update.factors()
        if u.dim() != 2:
            raise ValueError(f"{module}: one update per matrix, not a stack {tuple(u.shape)}")
        tensors[f"{PEFT_PREFIX}{module}.lora_A.weight"] = v.T.contiguous()  # [r, in]
        tensors[f"{PEFT_PREFIX}{module}.lora_B.weight"] = u.contiguous()  # [out, r]
    return tensors


def peft_config(updates: Mapping[str, LowRank], base_model: str) -> dict:
    """adapter_config.json of a plain LoRA (vLLM's peft_helper accepts it): one rank for all."""
    ranks = {update.rank for update in updates.values()}
    if len(ranks) != 1:
        raise ValueError(f"a PEFT adapter written here has one rank; got {sorted(ranks)}")
    rank = ranks.pop()
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": rank,
        "lora_alpha": rank,
        "target_modules": sorted({m.rsplit(".", 1)[-1] for m in updates}),
        "bias": "none",
        "lora_dropout": 0.0,
        "fan_in_fan_out": False,
        "modules_to_save": None,
        "use_rslora": False,
        "use_dora": False,
        "base_model_name_or_path": base_model,
    }


def save_peft_adapter(path: str | Path, updates: Mapping[str, LowRank], base_model: str) -> None:
    """A PEFT LoRA folder (adapter_model.safetensors + adapter_config.json) for `updates`."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    config = peft_config(updates, base_model)
    save_file(peft_state_dict(updates), str(path / "adapter_model.safetensors"))
    (path / "adapter_config.json").write_text(json.dumps(config, indent=1))


def load_peft_adapter(path: str | Path) -> dict[str, LowRank]:
    """Module name -> update of a PEFT LoRA folder (plain LoRA: no DoRA, no per-module ranks)."""
    path = Path(path)
    config = json.loads((path / "adapter_config.json").read_text())
    if config.get("peft_type") != "LORA" or config.get("use_dora"):
        raise ValueError(f"{path}: not a plain LoRA adapter (DoRA or another method)")
    if config.get("rank_pattern") or config.get("alpha_pattern"):
        raise ValueError(f"{path}: per-module ranks or alphas are not read here")
    rank, alpha = config["r"], config["lora_alpha"]
    scale = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
    tensors = load_file(str(path / "adapter_model.safetensors"))
    out = {}
    for key, lora_a in tensors.items():
        if key.endswith(".lora_A.weight"):
            module = key.removeprefix(PEFT_PREFIX).removesuffix(".lora_A.weight")
            lora_b = tensors[key.replace(".lora_A.", ".lora_B.")]
            out[module] = LowRank(lora_b, lora_a.T, scale)
    return out


def from_peft_model(model) -> dict[str, LowRank]:
    """Module name (HF, as in the base model) -> the active LoRA update of each LoRA layer of a
    PEFT model: its tensors, not copies. LoRA, PiSSA, minor, mica are plain low-rank; DoRA is not
    (its magnitude rescales W + dW) and is refused."""
    from peft.tuners.lora import LoraLayer  # deferred: peft imports transformers

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    out = {}
    for name, layer in base.named_modules():
        if not isinstance(layer, LoraLayer):
            continue
        active = [a for a in layer.active_adapters if a in layer.lora_A]
        if len(active) != 1:
            raise ValueError(f"{name}: {len(active)} active LoRA adapters, expected one")
        adapter = active[0]
        if layer.use_dora.get(adapter) or getattr(layer, "fan_in_fan_out", False):
            raise ValueError(f"{name}: a DoRA or fan-in-fan-out layer is no plain U V^T")
        lora_a, lora_b = layer.lora_A[adapter].weight, layer.lora_B[adapter].weight  # [r, in]
        out[name] = LowRank(lora_b, lora_a.T, float(layer.scaling[adapter]))  # [out, r], [in, r]
    return out
