"""Wall time of `rlx quantize` (QuantLRM W4 g128) stage by stage, untuned and with tuned scales.

bench/quant.py times each quantisation too, but it needs vLLM for the rewards; this bench needs
only torch and rlx's own dependencies, so it also runs on a GPU machine without vLLM. Each
`--tune-steps` value is one `quantize_model` run (the same calibration data, seed 0), on
`--device`; its rows show the seconds per stage as recorded in rlx_quant.json.

Weights: `--finetuned` (and `--base`) name real checkpoints. Where they cannot be moved to the
machine, `--random-init DIR` builds both from DIR's config.json and tokenizer files (a checkpoint
folder without its weights): a seeded random base and, as the fine-tuned model, the base with
seeded noise of 1e-3 on every matrix, both stored in the config's dtype. Wall time depends on the
shapes and the step counts, not on the weights' values; the quality of the result does, so this
bench reports seconds only (bench/quant.py reports rewards, bench/quant_kl.py the token KL).

Commands (from the repository root):
    .venv/bin/python bench/quant_time.py --finetuned runs/grpo_smollm2/final --tune-steps 0 240
    python3 bench/quant_time.py --random-init DIR --device cuda --tune-steps 0 240 240

Target (issue 5): <= 60 s per quantisation of the 135M model. The first run is the baseline; the
line before the last is `tune_time_ratio=<last run's total / first run's total>` and the last line
`quant_seconds_vs_target=<last run's total / 60 s>`.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path

import torch
import yaml

from rlx.quant import CalibrationConfig, QuantizeConfig, TuneConfig, quantize_model
from rlx.quant.tune import kl_first_last

TARGET_SECONDS = 60.0
STAGES = ("load", "importance", "search", "tune", "quantize_export", "total")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--finetuned", help="fine-tuned model folder (quantised)")
    src.add_argument(
        "--random-init",
        metavar="DIR",
        help="build random base and fine-tuned models from DIR's config.json and tokenizer files",
    )
    p.add_argument("--base", default="smollm2", help="the model before fine-tuning (--finetuned)")
    p.add_argument("--device", default="auto", help="QuantizeConfig.device: auto, cpu, cuda")
    p.add_argument(
        "--tune-steps",
        type=int,
        nargs="+",
        default=[0, 240],
        help="one run per value; the first is the baseline",
    )
    p.add_argument(
        "--task-options",
        type=yaml.safe_load,
        default={"max_operand": 99, "ops": ["+"]},
        help="arithmetic task options of the calibration data (default: recipes/grpo.yaml's)",
    )
    p.add_argument("--num-threads", type=int, default=0, help="torch CPU threads (0: default)")
    p.add_argument("--json", default=None, help="also write the rows here")
    return p.parse_args()


def random_pair(src: Path, root: Path) -> tuple[str, str]:
    """Seeded random base and noisy 'fine-tuned' checkpoints shaped like `src`'s config."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    missing = [f for f in ("config.json", "tokenizer.json") if not (src / f).is_file()]
    if missing:
        raise SystemExit(f"--random-init {src}: no {', '.join(missing)} there")
    config = AutoConfig.from_pretrained(src)
    dtype = getattr(torch, str(config.dtype or "float32").removeprefix("torch."), torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(src)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).to(dtype)
    paths = []
    for name, noise in (("base", 0.0), ("finetuned", 1e-3)):
        gen = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for p in model.parameters():
                if p.ndim == 2 and noise:
                    p.add_(torch.randn(p.shape, generator=gen).to(dtype) * noise)
        model.save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
        paths.append(str(root / name))
    return paths[0], paths[1]


def main() -> None:
    args = parse_args()
    work = Path(tempfile.mkdtemp(prefix="rlx_quant_time_"))
    try:
        if args.random_init:
            base, finetuned = random_pair(Path(args.random_init), work)
        else:
            base, finetuned = args.base, args.finetuned
        rows = []
        for i, steps in enumerate(args.tune_steps):
            cfg = QuantizeConfig(
                base=base,
                finetuned=finetuned,
                method="quantlrm",
                bits=4,
                group_size=128,
                calib=CalibrationConfig(options=args.task_options),
                tune=TuneConfig(steps=steps),
                out=str(work / f"q{i}"),
                device=args.device,
                num_threads=args.num_threads,
            )
            result = quantize_model(cfg)
            meta = json.loads((result.out / "rlx_quant.json").read_text())
            kl = kl_first_last(meta["tune_kl"]) if meta["tune_kl"] else (None, None, 0)
            rows.append(
                {
                    "tune_steps": steps,
                    "device": meta["device"],
                    "cuda_graph": (meta["tune"] or {}).get("cuda_graph", False),
                    "graph_error": (meta["tune"] or {}).get("cuda_graph_error"),
                    **{s: result.seconds.get(s, 0.0) for s in STAGES},
                    "tune_kl_first": kl[0],
                    "tune_kl_last": kl[1],
                }
            )
            shutil.rmtree(result.out)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "none"
    print(f"\nQuantLRM W4 g128, 8 x 256 calibration tokens; GPU: {gpu}; torch {torch.__version__}")
    stages = " | ".join(f"{s} s" for s in STAGES)
    print(f"| tune steps | device | CUDA graph | {stages} | tune KL, first -> last tenth |")
    print("|---" * (len(STAGES) + 4) + "|")
    for r in rows:
        kl = (
            ""
            if r["tune_kl_first"] is None
            else f"{r['tune_kl_first']:.4f} -> {r['tune_kl_last']:.4f}"
        )
        cells = " | ".join(f"{r[s]:.1f}" for s in STAGES)
        print(f"| {r['tune_steps']} | {r['device']} | {r['cuda_graph']} | {cells} | {kl} |")
        if r["graph_error"]:
            print(f"  (CUDA graph capture failed: {r['graph_error']})")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    print(f"tune_time_ratio={rows[-1]['total'] / rows[0]['total']:.2f}")
    print(f"quant_seconds_vs_target={rows[-1]['total'] / TARGET_SECONDS:.3f}")


if __name__ == "__main__":
    main()
