"""`rlx quantize`: check inputs, compute importance, search scales and clips, quantise, export.

    from rlx.quant import QuantizeConfig, quantize_model
    result = quantize_model(QuantizeConfig(base="smollm2", finetuned="runs/rl/final", out="q4"))

Order of work: every check that can fail on bad input (models, shapes, kernel limits, group sizes,
calibration source and data, output folder) runs first, from config files and the tokenizer only;
then the models are loaded, importance computed (QuantLRM: dW from base and fine-tuned weights, or
from a pseudo-fine-tune; AWQ: calibration activations; RTN: none), each layer is searched and
clipped (rlx.quant.scale_search), every linear GPTQ-rounded (rlx.quant.gptq) or rounded to
nearest (rlx.quant.quantizer), optionally the scales tuned (rlx.quant.tune), and the result
exported (rlx.quant.export). The work between loading and export runs on `QuantizeConfig.device`
(a GPU when there is one); the export is written from CPU memory. A failure at any point leaves
no output folder behind.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from rlx.config import QuantizeConfig, to_dict
from rlx.hardware import auto_dtype
from rlx.models import resolve_model
from rlx.quant.calibration import calibration_blocks, check_calibration_source
from rlx.quant.checks import (
    LINEAR_NAMES,
    Geometry,
    QuantError,
    check_int4_kernel,
    check_same_model,
    describe_group_plan,
    geometry,
    layer_group_sizes,
)
from rlx.quant.export import write_dequantized, write_pack_quantized
from rlx.quant.importance import activation_importance, quantlrm_importances
from rlx.quant.pseudo_finetune import pseudo_finetune
from rlx.quant.quantizer import QuantizedWeight, quantize_weight
from rlx.quant.scale_search import SCALE_GROUPS, HeadLayout, awq_layer
from rlx.quant.tune import tune_scales

DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}


@dataclass
class Plan:
    """Everything decided from the inputs before any work."""

    finetuned: str  # resolved source of the model to quantise
    base: str | None
    geometry: Geometry
    group_sizes: dict[str, int]  # per linear of a layer
    out: Path
    stored_dtype: torch.dtype  # the fine-tuned checkpoint's dtype
    tokenizer: str  # where the tokenizer comes from: the fine-tuned folder, else the base
    device: torch.device  # where the searches, GPTQ and tuning run
    notes: list[str] = field(default_factory=list)


@dataclass
class QuantResult:
    """What `quantize_model` did: the export folder, the fake-quantised model, timings."""

    out: Path
    model: torch.nn.Module  # the fake-quantised model (float32): what the export decodes to
    plan: Plan
    seconds: dict[str, float]
    report: dict


def _resolve(name: str, role: str) -> tuple[str, dict]:
    try:
        source = resolve_model(name)
        return source, AutoConfig.from_pretrained(source).to_dict()
    except (OSError, ValueError) as err:
        raise QuantError(f"{role} model {name!r}: {err}") from err


def plan_quantization(cfg: QuantizeConfig) -> Plan:
    """All checks on bad input (QuantError), from config files only; no weights are loaded."""
    source, config = _resolve(cfg.finetuned, "fine-tuned")
    geo = geometry(config, cfg.finetuned)
    base_source, notes = None, []
    if cfg.base is not None:
        base_source, base_config = _resolve(cfg.base, "base")
        check_same_model(base_config, config, cfg.base, cfg.finetuned)
    if cfg.method == "quantlrm" and cfg.base is None:
        notes.append("no base model: dW from a pseudo-fine-tune on the calibration data")
    elif cfg.method != "quantlrm" and cfg.base is not None:
        notes.append(f"method {cfg.method} uses no dW; the base model only checks shapes")
    plan = layer_group_sizes(geo, cfg.group_size)
    notes.append(describe_group_plan(plan, cfg.group_size))
    if cfg.resolved_format == "pack-quantized":
        check_int4_kernel(geo)
    check_calibration_source(cfg.calib.source)
    out = Path(cfg.out).expanduser()
    if out.exists() and not cfg.overwrite and (not out.is_dir() or any(out.iterdir())):
        raise QuantError(f"output folder {out} exists and is not empty; pass overwrite=true")
    stored = config.get("dtype") or config.get("torch_dtype") or "float32"
    stored_dtype = getattr(torch, str(stored).removeprefix("torch."), torch.float32)
    tokenizer = _tokenizer_source(source, base_source, notes)
    base = base_source if cfg.method == "quantlrm" else None  # only QuantLRM loads its weights
    device = _device(cfg.device)
    return Plan(source, base, geo, plan, out, stored_dtype, tokenizer, device, notes)


def _device(name: str) -> torch.device:
    """`QuantizeConfig.device` resolved; QuantError for a GPU that torch does not see."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if (device.index or 0) >= count:
            raise QuantError(
                f"device={name}, but torch sees {count} CUDA device(s) (torch {torch.__version__}); "
                "use device=cpu, or auto to take a GPU only when there is one"
            )
    return device


def _tokenizer_source(finetuned: str, base: str | None, notes: list[str]) -> str:
    """Training checkpoints (e.g. recipes/pg.py's checkpoints/*/model) may hold no tokenizer."""
    files = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")
    if not Path(finetuned).is_dir() or any((Path(finetuned) / f).is_file() for f in files):
        return finetuned
    if base is not None:
        notes.append(f"{finetuned} has no tokenizer; using the base model's ({base})")
        return base
    raise QuantError(f"{finetuned} has no tokenizer files: pass --base to take the base model's")


def _linear_weights(model, n_layers: int) -> list[list[str]]:
    names = {n for n, _ in model.named_parameters()}
    layers = [[f"model.layers.{i}.{lin}.weight" for lin in LINEAR_NAMES] for i in range(n_layers)]
    missing = [n for row in layers for n in row if n not in names]
    if missing:
        raise QuantError(f"model has no parameters {missing[:3]}...: unsupported layout")
    return layers


class _Stop(Exception):
    """Raised by a hook to end a forward pass early."""


def _first_layer_inputs(model, blocks: torch.Tensor, dtype: torch.dtype):
    """Input hidden states of decoder layer 0 [N, L, H] and the kwargs every layer receives."""
    captured = {}

    def hook(_module, args, kwargs):
        captured["x"], captured["kwargs"] = args[0].detach(), kwargs
        raise _Stop

    handle = model.model.layers[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            model.model(input_ids=blocks, use_cache=False)
    except _Stop:
        pass
    finally:
        handle.remove()
    keep = {}
    for k, v in captured["kwargs"].items():
        if k == "position_embeddings":
            keep[k] = tuple(t.to(dtype) for t in v)
        elif k in ("attention_mask", "position_ids", "cache_position"):
            keep[k] = v.to(dtype) if v is not None and v.is_floating_point() else v
    return captured["x"].to(dtype), keep


def _importance_fn(cfg, plan, model, base_weights, layer_names, blocks, report):
    """Per layer: importance(linear_name, its_input) for the chosen method."""
    if cfg.method == "awq":
        return lambda _layer: lambda _name, x: activation_importance(x)
    after = {n: p.detach() for n, p in model.named_parameters()}
    if base_weights is None:  # QuantLRM without a base: dW from a pseudo-fine-tune
        pf = cfg.pseudo_finetune
        torch.manual_seed(cfg.seed)
        base_weights = after
        after = pseudo_finetune(model, blocks, pf.steps, pf.lr, pf.batch_sequences)
    sources = [f"{g.linears[0]}.weight" for g in SCALE_GROUPS]
    delta_dtype = plan.stored_dtype if cfg.delta_dtype == "auto" else DTYPES[cfg.delta_dtype]
    per_layer, stats = quantlrm_importances(
        base_weights, after, layer_names, sources, delta_dtype, cfg.quadratic_range
    )
    report["delta_stats"] = {**stats.__dict__, "dtype": str(delta_dtype).removeprefix("torch.")}
    return lambda i: lambda name, _x: per_layer[i][f"{name}.weight"]


def _load_base(plan: Plan, model, layer_names) -> dict[str, torch.Tensor]:
    base = AutoModelForCausalLM.from_pretrained(plan.base, dtype=torch.float32)
    weights = dict(base.named_parameters())
    ours = dict(model.named_parameters())
    for name in (n for row in layer_names for n in row):
        if name not in weights or weights[name].shape != ours[name].shape:
            got = tuple(weights[name].shape) if name in weights else "missing"
            raise QuantError(f"base {name}: {got} vs fine-tuned {tuple(ours[name].shape)}")
    return {n: weights[n].detach().to(plan.device) for row in layer_names for n in row}


def quantize_model(cfg: QuantizeConfig, show_progress: bool = True) -> QuantResult:
    """Quantise `cfg.finetuned` with `cfg.method` and export it to `cfg.out` (see module doc)."""
    threads = torch.get_num_threads()
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    try:
        return _quantize(cfg, show_progress)
    finally:
        torch.set_num_threads(threads)


def _quantize(cfg: QuantizeConfig, show_progress: bool) -> QuantResult:
    times: dict[str, float] = {}
    start = time.perf_counter()
    plan = plan_quantization(cfg)
    tokenizer = AutoTokenizer.from_pretrained(plan.tokenizer)
    # One packed stream: the searches read its first calib.num_sequences blocks, tuning (if on)
    # its first tune.num_sequences. Packing it once up front also fails early on a short source.
    n_blocks = max(cfg.calib.num_sequences, cfg.tune.num_sequences if cfg.tune.steps else 0)
    all_blocks = calibration_blocks(
        tokenizer,
        cfg.calib.source,
        n_blocks,
        cfg.calib.seq_len,
        cfg.calib.split,
        cfg.calib.seed,
        cfg.calib.options,
    ).to(plan.device)
    blocks = all_blocks[: cfg.calib.num_sequences]
    model = AutoModelForCausalLM.from_pretrained(plan.finetuned, dtype=torch.float32)
    model = model.to(plan.device).eval()
    layer_names = _linear_weights(model, plan.geometry.layers)
    base_weights = _load_base(plan, model, layer_names) if plan.base else None
    times["load"] = time.perf_counter() - start

    report: dict = {"notes": plan.notes}
    geo, search_dtype = plan.geometry, DTYPES[auto_dtype(cfg.search_dtype)]
    alphas, gptq = [], {}
    gptq_dtype = DTYPES[cfg.dtype] if cfg.rounding == "gptq" else None
    if cfg.method != "rtn":
        t = time.perf_counter()
        importance_for = _importance_fn(cfg, plan, model, base_weights, layer_names, blocks, report)
        times["importance"] = time.perf_counter() - t
        t = time.perf_counter()
        x, layer_kwargs = _first_layer_inputs(model, blocks, search_dtype)
        heads = HeadLayout(geo.heads, geo.kv_heads, geo.head_dim)
        steps = ["scale search"]
        if cfg.resolved_clip:
            steps.append("clip search")
        if gptq_dtype:
            steps.append("GPTQ")
        desc = f"{cfg.method} W{cfg.bits}: " + " + ".join(steps)
        for i, layer in enumerate(
            tqdm(model.model.layers, desc=desc, unit="layer", disable=not show_progress)
        ):
            result = awq_layer(
                layer,
                x,
                layer_kwargs,
                importance_for(i),
                plan.group_sizes,
                cfg.bits,
                heads,
                cfg.alpha_grid,
                cfg.resolved_clip,
                cfg.clip_grid,
                cfg.clip_max_shrink,
                search_dtype,
                gptq_dtype,
                cfg.act_order,
            )
            alphas.append(result.alphas)
            gptq.update({f"model.layers.{i}.{k}.weight": q for k, q in result.quantized.items()})
            x = result.output
        times["search"] = time.perf_counter() - t
    report["alphas"] = alphas

    t = time.perf_counter()
    dtype = DTYPES[cfg.dtype]
    quantized: dict[str, QuantizedWeight] = {}
    with torch.no_grad():
        for row in layer_names:
            for name, lin in zip(row, LINEAR_NAMES, strict=True):
                quantized[name] = gptq.get(name) or quantize_weight(
                    model.get_parameter(name), cfg.bits, plan.group_sizes[lin], dtype
                )
        # The fake-quantised model stays float32: exact dequantised linears, and every other
        # tensor rounded to the export dtype, i.e. exactly what the export decodes to.
        for name, p in model.named_parameters():
            p.copy_(quantized[name].dequantize() if name in quantized else p.to(dtype).float())
    if cfg.tune.steps:
        t_tune = time.perf_counter()
        teacher = AutoModelForCausalLM.from_pretrained(plan.finetuned, dtype=torch.float32)
        teacher = teacher.to(plan.device).eval()
        report["tune"] = {}
        report["tune_kl"] = tune_scales(
            model,
            teacher,
            quantized,
            all_blocks[: cfg.tune.num_sequences],
            cfg.tune.steps,
            cfg.tune.lr,
            cfg.tune.batch_sequences,
            dtype,
            show_progress=show_progress,
            report=report["tune"],
        )
        del teacher
        times["tune"] = time.perf_counter() - t_tune
    model = model.cpu()  # the export is written, and the result returned, from CPU memory
    quantized = {name: q.cpu() for name, q in quantized.items()}
    metadata = _metadata(cfg, plan, times, report)
    if cfg.resolved_format == "pack-quantized":
        tied = getattr(model.config, "tie_word_embeddings", False)
        dense = {
            k: v
            for k, v in model.state_dict().items()
            if k not in quantized and not (tied and k == "lm_head.weight")
        }
        write_pack_quantized(
            plan.out,
            plan.finetuned,
            tokenizer,
            dense,
            quantized,
            plan.group_sizes,
            dtype,
            metadata,
            cfg.overwrite,
        )
    else:
        write_dequantized(plan.out, model, tokenizer, plan.finetuned, metadata, cfg.overwrite)
    times["quantize_export"] = time.perf_counter() - t - times.get("tune", 0.0)
    times["total"] = time.perf_counter() - start
    return QuantResult(plan.out, model, plan, times, report)


def _metadata(cfg: QuantizeConfig, plan: Plan, times: dict, report: dict) -> dict:
    return {
        "config": to_dict(cfg),
        "format": cfg.resolved_format,
        "device": str(plan.device),  # where the searches, GPTQ and tuning ran
        "rounding": "nearest" if cfg.method == "rtn" else cfg.rounding,  # what was applied
        "clip": cfg.method != "rtn" and cfg.resolved_clip,
        "group_sizes": plan.group_sizes,
        "notes": plan.notes,
        "seconds_before_export": dict(times),
        "delta_stats": report.get("delta_stats"),
        "alphas": report.get("alphas"),
        "tune_kl": report.get("tune_kl"),  # calibration KL per tuning step (null: no tuning)
        "tune": report.get("tune"),  # {"cuda_graph": whether the steps were replayed, ...}
    }
