"""Configs of `rlx quantize` and `rlx eval`."""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Literal

from rlx.config.choices import AutoDtype, Dtype, ExportFormat, Int4Serving, QuantMethod, Rounding
from rlx.config.common import RewardConfig, TaskConfig
from rlx.config.core import AUTO_DTYPE, ConfigError, knob, require


@dataclasses.dataclass
class CalibrationConfig:
    """Calibration text: what the activations (AWQ, the searches) and pseudo-fine-tuning see."""

    source: str = knob(
        "arithmetic",
        help="registered task, or a .jsonl/.json/.parquet file or saved dataset folder with a "
        "`prompt` column (chat messages or text) and optionally a `completion` column",
    )
    split: str = knob("train", help="split of the source to read")
    num_sequences: int = knob(8, help="calibration blocks (paper: 128; CPU default 8)")
    seq_len: int = knob(256, help="tokens per block, rows packed back to back (paper: 512)")
    seed: int = knob(0, help="seed of generated tasks")
    options: dict[str, Any] = knob(
        {},
        help="options of a registered task, e.g. {max_operand: 99, ops: ['+']}: calibrate on "
        "the task the model was fine-tuned on",
    )

    def __post_init__(self) -> None:
        require(bool(self.source), "source", "a task name or a path", self.source)
        require(self.num_sequences >= 1, "num_sequences", ">= 1", self.num_sequences)
        require(self.seq_len >= 16, "seq_len", ">= 16", self.seq_len)


@dataclasses.dataclass
class PseudoFinetuneConfig:
    """QuantLRM's pseudo-fine-tuning when no base model is given (see rlx/quant/pseudo_finetune.py)."""

    steps: int = knob(16, help="AdamW steps on the calibration blocks")
    lr: float = knob(1e-5, help="learning rate")
    batch_sequences: int = knob(4, help="calibration blocks per step")

    def __post_init__(self) -> None:
        require(self.steps >= 1, "steps", ">= 1", self.steps)
        require(self.lr > 0, "lr", "> 0", self.lr)
        require(self.batch_sequences >= 1, "batch_sequences", ">= 1", self.batch_sequences)


@dataclasses.dataclass
class TuneConfig:
    """End-to-end tuning of the stored scales and norm weights after rounding (rlx/quant/tune.py)."""

    steps: int = knob(
        0,
        help="Adam steps of KL distillation from the fine-tuned model; 0 = off. Costs minutes on a "
        "CPU, seconds on a GPU; what it buys: docs/quantization.md",
    )
    lr: float = knob(2e-4, help="learning rate of the log-gains (scale = stored scale * exp(u))")
    num_sequences: int = knob(
        96,
        help="calibration blocks it trains on (calib.seq_len tokens each); with the searches' 8 "
        "it fits them and the held-out KL barely moves",
    )
    batch_sequences: int = knob(4, help="calibration blocks per step")

    def __post_init__(self) -> None:
        require(self.steps >= 0, "steps", ">= 0", self.steps)
        require(self.lr > 0, "lr", "> 0", self.lr)
        require(self.num_sequences >= 1, "num_sequences", ">= 1", self.num_sequences)
        require(self.batch_sequences >= 1, "batch_sequences", ">= 1", self.batch_sequences)


@dataclasses.dataclass
class QuantizeConfig:
    """`rlx quantize`: weight-only int quantisation (QuantLRM, AWQ or RTN) and export."""

    finetuned: str = knob("smollm2", help="the model to quantise (alias, folder or hub id)")
    base: str | None = knob(
        None, help="the model before fine-tuning (QuantLRM's dW); null = pseudo-fine-tune"
    )
    method: QuantMethod = knob(
        "quantlrm",
        help="channel importance: fine-tuning dW, activations, or none (round-to-nearest)",
    )
    bits: Literal[3, 4] = knob(4, help="weight bits")
    group_size: int = knob(
        128,
        help="input channels per scale (32, 64, 128); falls back per layer where it does not divide",
    )
    calib: CalibrationConfig = knob(CalibrationConfig(), help="calibration data")
    alpha_grid: int = knob(20, help="scale exponents alpha in {0, 1/n, ..., (n-1)/n}")
    quadratic_range: float = knob(10.0, help="R of QuantLRM's restricted quadratic")
    delta_dtype: AutoDtype = knob(
        "auto",
        help="precision in which W_before and W_after are compared (what counts as a zero "
        "update); auto = the dtype the fine-tuned checkpoint is stored in",
    )
    clip: bool | None = knob(
        None,
        help="run AWQ's weight-clipping search after the scale search; null = only with rounding "
        "nearest (before GPTQ it hurts: docs/quantization.md)",
    )
    rounding: Rounding = knob(
        "gptq",
        help="how awq/quantlrm round the scaled (with clip: clipped) weights: GPTQ (each column's "
        "error pushed onto later columns through the calibration Hessian) or to the nearest grid "
        "point; rtn always rounds to nearest",
    )
    act_order: bool = knob(
        True,
        help="GPTQ: quantise input channels in order of decreasing activation energy, with each "
        "group's range fixed beforehand (same export layout; see rlx/quant/gptq.py)",
    )
    clip_grid: int = knob(20, help="clip ratios 1 - i/n")
    clip_max_shrink: float = knob(0.5, help="largest fraction of max|w| clipped away")
    search_dtype: AutoDtype = knob(
        "auto",
        help=f"dtype of the layer forwards inside the searches; {AUTO_DTYPE}",
    )
    export_format: ExportFormat = knob(
        "auto",
        help="pack-quantized: compressed-tensors int4 (vLLM, transformers); dequantized: dense "
        "weights (any bits, for evaluation); auto: pack-quantized at 4 bits, dequantized at 3",
    )
    dtype: Dtype = knob("bfloat16", help="dtype of scales and unquantised tensors in the export")
    pseudo_finetune: PseudoFinetuneConfig = knob(
        PseudoFinetuneConfig(), help="used by method=quantlrm when base is null"
    )
    tune: TuneConfig = knob(
        TuneConfig(), help="optional tuning of the scales and norm weights after rounding"
    )
    out: str = knob("runs/quantize", help="output folder (written atomically)")
    overwrite: bool = knob(False, help="replace an existing output folder")
    seed: int = knob(0, help="seed for pseudo-fine-tuning")
    num_threads: int = knob(
        0, help="torch CPU threads while quantising; 0 = torch's default (all cores)"
    )
    device: str = knob(
        "auto",
        help="where the searches, GPTQ and tuning run: auto = cuda when torch sees a GPU, else "
        "cpu; or cpu, cuda, cuda:N. The export is the same either way (written from the CPU)",
    )

    def __post_init__(self) -> None:
        require(self.num_threads >= 0, "num_threads", ">= 0", self.num_threads)
        require(
            self.device in ("auto", "cpu", "cuda") or bool(re.fullmatch(r"cuda:\d+", self.device)),
            "device",
            "auto, cpu, cuda or cuda:N",
            self.device,
        )
        require(bool(self.finetuned), "finetuned", "a model name or folder", self.finetuned)
        require(self.group_size in (32, 64, 128), "group_size", "32, 64 or 128", self.group_size)
        require(self.alpha_grid >= 1, "alpha_grid", ">= 1", self.alpha_grid)
        require(self.quadratic_range >= 1, "quadratic_range", ">= 1", self.quadratic_range)
        require(self.clip_grid >= 1, "clip_grid", ">= 1", self.clip_grid)
        require(0 < self.clip_max_shrink < 1, "clip_max_shrink", "in (0, 1)", self.clip_max_shrink)
        require(bool(self.out), "out", "a non-empty path", self.out)
        if self.bits == 3 and self.export_format == "pack-quantized":
            raise ConfigError(
                "export_format pack-quantized needs bits 4: vLLM's CPU kernel is 4-bit only and "
                "vLLM packs 3-bit weights differently from compressed-tensors; use dequantized"
            )

    @property
    def resolved_clip(self) -> bool:
        """Whether the clipping search runs, after resolving null."""
        return self.rounding == "nearest" if self.clip is None else self.clip

    @property
    def resolved_format(self) -> str:
        """The export format after resolving "auto"."""
        if self.export_format == "auto":
            return "pack-quantized" if self.bits == 4 else "dequantized"
        return self.export_format


@dataclasses.dataclass
class EvalCommandConfig:
    """`rlx eval`: greedy held-out evaluation of one or more models through vLLM."""

    models: list[str] = knob(["smollm2"], help="models to evaluate (fp or quantised folders)")
    task: TaskConfig = knob(
        TaskConfig(split="test", num_prompts=200), help="held-out prompts (split test by default)"
    )
    rewards: list[RewardConfig] = knob([], help="reward functions; empty = the task's defaults")
    max_new_tokens: int = knob(64, help="most tokens generated per completion")
    stop: list[str] = knob(["</answer>"], help="stop strings")
    dtype: AutoDtype = knob(
        "auto",
        help=f"engine dtype; {AUTO_DTYPE}; int4 served by vLLM-CPU's kernel is always bfloat16",
    )
    int4: Int4Serving = knob(
        "auto",
        help="int4 exports: vllm = vLLM's int4 kernel (an error where the vLLM build lacks it), "
        "dequantize = unpack to float32 and serve that, auto = vllm where available",
    )
    max_model_len: int = knob(1024, help="engine context length")
    kv_cache_gib: int = knob(1, help="KV cache size in GiB (vLLM CPU)")
    output_json: str | None = knob(None, help="also write the results table here as JSON")

    def __post_init__(self) -> None:
        require(bool(self.models) and all(self.models), "models", "non-empty names", self.models)
        require(self.max_new_tokens >= 1, "max_new_tokens", ">= 1", self.max_new_tokens)
        require(self.kv_cache_gib >= 1, "kv_cache_gib", ">= 1", self.kv_cache_gib)
