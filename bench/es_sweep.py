"""Short EGGROLL runs that vary one thing at a time from recipes/es.yaml, by held-out gain.

    .venv/bin/python bench/es_sweep.py --arms base sigma_half lr2x --minutes 9.5 --out runs/es_sweep
    .venv/bin/python bench/es_sweep.py --list                 # every arm and its overrides
    .venv/bin/python bench/es_sweep.py --model tiny --arms base lr2x --steps 2    # smoke test

Every run is `recipes/es.py --config recipes/es.yaml` with the same `max_run_minutes` (both
held-out evaluations included, so a slower arm runs fewer steps) plus its arm's overrides. The
task is the main job's two-digit addition (recipes/grpo.yaml's task), or with --task sums20 sums
and differences up to 20. Per arm, mean over seeds: held-out gain
(eval.json after - before), steps, median step time, and from metrics.jsonl the medians of
fitness_snr (1 = no signal) and update RMS / sigma. A finished run in --out is read back
(result.json), not run again; its checkpoints are deleted once measured.
Run it on an idle machine: anything beside it slows the population and vLLM by up to 10x.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

TASKS = {
    "add2": 'task.options={one_shot: true, max_operand: 99, ops: ["+"]}',
    "sums20": 'task.options={one_shot: true, max_operand: 20, ops: ["+", "-"]}',
}
# recipes/es.yaml before the population moved to vLLM: batched HF generate, sigma 5e-3, lr 5e-3
HF = ["es.evaluator=hf_batched", "es.sigma=0.005", "es.lr=0.005"]
MLP = "[gate_proj,up_proj,down_proj]"
ARMS: dict[str, list[str]] = {  # each: the overrides of recipes/es.yaml (the task is added)
    "base": [],
    "lr_half": ["es.lr=0.005"],
    "lr2x": ["es.lr=0.02"],
    "sigma_half": ["es.sigma=0.005"],
    "sigma_half_lr_half": ["es.sigma=0.005", "es.lr=0.005"],  # the HF-era settings, on vLLM
    "sigma_half_lr2x": ["es.sigma=0.005", "es.lr=0.02"],
    "sigma_half_mlp": ["es.sigma=0.005", f"es.target_modules={MLP}"],
    "sigma2x": ["es.sigma=0.02"],
    "mlp": [f"es.target_modules={MLP}"],
    "pop128": ["es.population_size=128", "prompts_per_step=16"],
    "all": ["es.prompt_assignment=all", "prompts_per_step=4", "es.population_size=16"],
    "adam": ["es.optimizer=adam", "es.lr=0.0005"],
    "rank4": ["es.rank=4"],
    "reuse0": ["es.noise_reuse=0"],
    "zscore": ["es.fitness_shaping=zscore"],
    "pair_sign": ["es.fitness_shaping=pair_sign"],
    "sampled": ["rollout.temperature=0.7"],
    # the earlier sweep, on the HF-batched population
    "hf_base": HF,
    "hf_lr4": [*HF, "es.lr=0.02"],
    "hf_pop32_lr2": [*HF, "es.population_size=32", "es.lr=0.01"],
    "hf_pop32_lr8": [*HF, "es.population_size=32", "es.lr=0.04"],
    "hf_reuse0": [*HF, "es.noise_reuse=0", "es.lr=0.02"],
}
ARM_WIDTH = max(map(len, ARMS))  # the table's first column
TINY_REWARD = (
    "def longer(prompts, completions, **kw):\n"
    "    return [min(len(c), 40) / 40 for c in completions]\n"
)
TINY = [
    "es.population_size=8",
    "prompts_per_step=2",
    "rollout.max_new_tokens=8",
    "eval.max_new_tokens=8",
    "eval.num_prompts=8",
    "rollout.dtype=float32",
    "es.population_dtype=float32",
]


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--arms", nargs="+", choices=list(ARMS), default=["base", "sigma_half", "lr2x"])
    p.add_argument("--seeds", type=int, default=1, help="runs per arm (seeds 0..n-1)")
    p.add_argument("--task", choices=list(TASKS), default="add2", help="the arithmetic task")
    p.add_argument("--minutes", type=float, default=5.0, help="max_run_minutes of every run")
    p.add_argument(
        "--steps", type=int, default=1000, help="step cap (default: the clock ends runs)"
    )
    p.add_argument("--model", default="smollm2", help='alias, folder or "tiny"')
    p.add_argument("--out", default=None, help="keep the runs here (default: a temporary folder)")
    p.add_argument("--list", action="store_true", help="print the arms and exit")
    return p.parse_args()


def overrides(arm: str, task: str) -> list[str]:
    """The arm's overrides of recipes/es.yaml, after the task's."""
    return [TASKS[task], *ARMS[arm]]


def run(arm: str, seed: int, model: str, args, out: Path) -> dict:
    """One ES run: held-out gain, steps, step time, fitness_snr and update RMS / sigma."""
    if (out / "result.json").exists():
        return json.loads((out / "result.json").read_text())
    cmd = [sys.executable, str(ROOT / "recipes" / "es.py")]
    cmd += ["--config", str(ROOT / "recipes" / "es.yaml"), *overrides(arm, args.task)]
    cmd += [f"model.name={model}", f"seed={seed}", "log_with=[]", "max_minutes=0"]
    cmd += [f"max_run_minutes={args.minutes}", f"output_dir={out}", "overwrite_output_dir=true"]
    cmd += [f"steps={args.steps}"]
    if args.model == "tiny":
        cmd += [*TINY, f"rewards=[{{func: '{out.parent / 'tiny_reward.py'}:longer'}}]"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{arm} seed {seed} failed:\n{proc.stderr[-3000:]}")
    results = json.loads((out / "eval.json").read_text())
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if r.get("step_time_s") is not None and not r.get("skipped")]
    before, after = results["before"]["reward_mean"], results["after"]["reward_mean"]
    result = {
        "before": before,
        "after": after,
        "gain": after - before,
        "steps": len(rows),
        "step_s": statistics.median(r["step_time_s"] for r in rows),
        "snr": statistics.median(r["fitness_snr"] for r in rows),
        "update": statistics.median(r["update_rms_over_sigma"] for r in rows),
        "train_reward_first": statistics.mean(r["reward_mean"] for r in rows[:5]),
        "train_reward_last": statistics.mean(r["reward_mean"] for r in rows[-5:]),
    }
    for bulky in ("checkpoints", "final"):
        shutil.rmtree(out / bulky, ignore_errors=True)
    (out / "result.json").write_text(json.dumps(result))
    return result


def mean(values) -> float:
    values = list(values)
    return statistics.mean(values) if values else math.nan


def main() -> None:
    args = parse_args()
    if args.list:
        for arm in ARMS:
            print(f"{arm:{ARM_WIDTH}} {' '.join(ARMS[arm])}")
        return
    tmp = Path(args.out or tempfile.mkdtemp(prefix="es-sweep-"))
    tmp.mkdir(parents=True, exist_ok=True)
    model = args.model
    if model == "tiny":
        from rlx.models.tiny import build_tiny_model

        model = str(build_tiny_model(tmp / "tiny"))
        (tmp / "tiny_reward.py").write_text(TINY_REWARD)
    runs = {}
    for arm in args.arms:
        runs[arm] = []
        for seed in range(args.seeds):
            runs[arm].append(run(arm, seed, model, args, tmp / f"{arm}_{seed}"))
            r = runs[arm][-1]
            print(f"{arm} seed {seed}: {r['before']:.3f} -> {r['after']:.3f} in {r['steps']} steps",
                  flush=True)  # fmt: skip

    print(
        f"\nmodel={args.model} task={args.task} seeds={args.seeds} max_run_minutes={args.minutes}"
    )
    head = f"{'arm':{ARM_WIDTH}} {'before':>6} {'after':>6} {'gain':>7} {'steps':>6} {'step s':>7}"
    print(head + f" {'train r first':>13} {'train r last':>12} {'snr':>6} {'upd/sigma':>9}")
    for arm, rs in runs.items():
        line = f"{arm:{ARM_WIDTH}} {mean(r['before'] for r in rs):6.3f} {mean(r['after'] for r in rs):6.3f}"
        line += f" {mean(r['gain'] for r in rs):+7.3f} {mean(r['steps'] for r in rs):6.1f}"
        line += f" {mean(r['step_s'] for r in rs):7.2f}"
        line += f" {mean(r['train_reward_first'] for r in rs):13.3f}"
        line += f" {mean(r['train_reward_last'] for r in rs):12.3f}"
        print(line + f" {mean(r['snr'] for r in rs):6.2f} {mean(r['update'] for r in rs):9.4f}")
    best = max(runs, key=lambda a: mean(r["gain"] for r in runs[a]))
    line = f"best_arm={best} gain={mean(r['gain'] for r in runs[best]):+.3f}"
    if "base" in runs:
        line += f" base_gain={mean(r['gain'] for r in runs['base']):+.3f}"
    print(line)


if __name__ == "__main__":
    main()
