"""Dynamic vs fixed reward weighting at equal steps: the final held-out hypervolume per arm.

    .venv/bin/python bench/multi_objective.py --out runs/mo_bench       # smollm2, 6 arms x 3 x 30
    .venv/bin/python bench/multi_objective.py --model tiny --steps 2 --seeds 1 \\
        --arms static_uniform hypervolume gradient                       # smoke test

Every run is recipes/multi_objective.yaml (GRPO on the arithmetic task; correctness, conciseness
paid to correct answers, format) with `steps` fixed and no time limit; the arms differ only in the
weighting. An arm is `name` or `name@normalization`; the name is static_uniform (1/3 each),
static_best_guess (0.6 correctness, 0.2 each other), hypervolume (the reference: uniform weights,
the meta-reward on the learning rate), gradient (uniform start), or hypervolume_adaptive; the
normalization is normalize_then_sum (the recipe's, the default) or sum_then_normalize. The
default arms are the four under normalize_then_sum and the two static ones under
sum_then_normalize too, which shows whether the weights act under each normalisation.

Each run's held-out point after training (greedy, eval.json's "after") is (correctness, mean
completion tokens, format), the length minimised. Its hypervolume is measured from one reference
point fixed before any run: the base model's point (evaluated first, by the same code as a run's
"before") less MARGIN in every objective, so a run that loses a little in one objective still
counts and no arm moves the reference. Finished runs in `--out` are read again, not rerun, so
arms or seeds can be added later to the same folder; `--out` remembers its model, steps and
`--set` overrides (settings.json) and refuses runs of other settings. `--set KEY=VALUE ...` passes
recipe overrides to every run, for example `--set prompts_per_step=4` for a cheaper step.

Prints the base point and the reference, each run's final point and hypervolume, each arm's mean
and std over seeds and its median step time, writes pareto.png (every final point, the base
point and the reference) in `--out`, and ends with two lines:
    hv_ratio_vs_uniform=<best dynamic arm's mean hypervolume / static_uniform's>
    hv_ratio_vs_best_static=<best dynamic arm's mean / the best static arm's, any normalisation>
(inf where the static arm's mean hypervolume is 0 and the dynamic arm's is not, nan where both are).
Run it on an idle machine: anything beside it slows vLLM-CPU by up to 10x.
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

from rlx.objectives import hypervolume, orient  # noqa: E402

RECIPE = ROOT / "recipes" / "multi_objective.yaml"
REWARDS = (
    "rewards/arithmetic.py:correctness",
    "rewards/multi_objective.py:concise_correct",
    "rewards/multi_objective.py:step_format",
)
STATIC = {"static_uniform": (1 / 3, 1 / 3, 1 / 3), "static_best_guess": (0.6, 0.2, 0.2)}
DYNAMIC = {
    "hypervolume": ["weighting.method=hypervolume"],
    "gradient": ["weighting.method=gradient"],
    "hypervolume_adaptive": ["weighting.method=hypervolume", "weighting.hv_adapt_weights=true"],
}
NORMALIZATIONS = ("normalize_then_sum", "sum_then_normalize")
DEFAULT_ARMS = [
    "static_uniform",
    "static_best_guess",
    "hypervolume",
    "gradient",
    "static_uniform@sum_then_normalize",
    "static_best_guess@sum_then_normalize",
]
MINIMISE = (False, True, False)  # correctness, completion length, format
MARGIN = (0.05, 10.0, 0.05)
"""The reference lies this far below the base model's point: correctness, tokens, format."""
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
    p.add_argument("--steps", type=int, default=30, help="training steps of every run")
    p.add_argument("--seeds", type=int, default=3, help="runs per arm (seeds 0..n-1)")
    p.add_argument("--arms", nargs="+", type=check_arm, default=DEFAULT_ARMS, help="name[@norm]")
    p.add_argument("--out", default=None, help="keep the runs here (default: a temporary folder)")
    p.add_argument(
        "--set",
        nargs="+",
        default=[],
        metavar="KEY=VALUE",
        help="recipe overrides for every run and the base point, e.g. prompts_per_step=4",
    )
    p.add_argument("--measure-base", default=None, help=argparse.SUPPRESS)  # the subprocess' mode
    p.add_argument("overrides", nargs="*", help=argparse.SUPPRESS)
    return p.parse_args()


def check_arm(arm: str) -> str:
    name, _, normalization = arm.partition("@")
    if name not in {**STATIC, **DYNAMIC} or (normalization and normalization not in NORMALIZATIONS):
        raise argparse.ArgumentTypeError(
            f"arm {arm!r}: use one of {sorted({**STATIC, **DYNAMIC})}, optionally "
            f"@{' or @'.join(NORMALIZATIONS)}"
        )
    return arm


def split_arm(arm: str) -> tuple[str, str]:
    """(name, normalization) of an arm; the recipe's normalisation when none is given."""
    name, _, normalization = arm.partition("@")
    return name, normalization or NORMALIZATIONS[0]


def arm_overrides(arm: str) -> list[str]:
    name, normalization = split_arm(arm)
    weights = STATIC.get(name, STATIC["static_uniform"])
    rewards = ", ".join(
        f"{{func: '{f}', weight: {w}}}" for f, w in zip(REWARDS, weights, strict=True)
    )
    method = DYNAMIC.get(name, ["weighting.method=static"])
    return [f"rewards=[{rewards}]", f"algo.reward_normalization={normalization}", *method]


def common_overrides(model: str, tiny: bool, extra: list[str]) -> list[str]:
    return [f"model.name={model}", *(TINY if tiny else []), *extra]


def check_settings(args: argparse.Namespace, out: Path) -> None:
    """Record the settings every run of `out` shares (out/settings.json), and refuse other
    settings: the finished runs there would be read back and mixed in with the new ones."""
    settings = {"model": args.model, "steps": args.steps, "set": args.set}
    path = out / "settings.json"
    if path.exists():
        old = json.loads(path.read_text())
        if old != settings:
            raise SystemExit(
                f"{out} holds runs made with {old}, not {settings}: pass the same --model, "
                "--steps and --set, or another --out"
            )
    else:
        path.write_text(json.dumps(settings))


def measure_base(overrides: list[str], path: Path) -> None:
    """The subprocess' job: the base model's held-out evaluation, as a run's "before" (the same
    engine, prompts, rewards and rlx.evaluation.evaluate), into `path`."""
    from rlx.config import PGConfig, load_config
    from rlx.data import load_held_out
    from rlx.evaluation import evaluate
    from rlx.models import load_model_and_tokenizer
    from rlx.rewards import resolve_rewards
    from rlx.rollout import make_engine

    cfg = load_config(PGConfig, str(RECIPE), overrides)
    _, tokenizer = load_model_and_tokenizer(cfg.model.name)
    data = load_held_out(cfg, tokenizer)
    engine = make_engine(cfg.rollout.backend, cfg.model.name, cfg.rollout, 0)
    rewards = resolve_rewards(cfg.task.name, cfg.rewards)
    summary = evaluate(engine, data, rewards, cfg.eval.max_new_tokens, cfg.rollout.stop)
    engine.close()
    path.write_text(json.dumps(summary))


def base_point(model: str, out: Path, tiny: bool, extra: list[str]) -> list[float]:
    """The base model's held-out point, measured once (out/base.json) before any run."""
    path = out / "base.json"
    if not path.exists():
        cmd = [sys.executable, __file__, "--measure-base", str(path), "--"]
        cmd += common_overrides(model, tiny, extra)
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"the base model's evaluation failed:\n{proc.stderr[-3000:]}")
    return held_out_point(json.loads(path.read_text()))


def run(
    arm: str, seed: int, model: str, steps: int, out: Path, tiny: bool, extra: list[str]
) -> dict:
    """One training run; its before / after held-out points and its median step time."""
    cmd = [sys.executable, str(ROOT / "recipes" / "pg.py"), "--config", str(RECIPE)]
    cmd += [*arm_overrides(arm), *common_overrides(model, tiny, extra)]
    cmd += [f"steps={steps}", f"seed={seed}", f"rollout.seed={seed}", "max_run_minutes=0"]
    cmd += ["log_with=[]", f"output_dir={out}", "overwrite_output_dir=true"]
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


def reference_point(base: list[float]) -> list[float]:
    """The hypervolume reference in maximisation form: the base point less MARGIN."""
    return [v - m for v, m in zip(orient(base, MINIMISE), MARGIN, strict=True)]


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def fmt(point: list[float]) -> str:
    return f"correctness={point[0]:.3f} length={point[1]:.1f} format={point[2]:.3f}"


def plot_pareto(runs: dict, base: list[float], ref: list[float], path: Path) -> None:
    """Every run's final point in two panels (correctness against length, and against format),
    one colour per arm, with the base model's point and the reference's lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    x_index = {0: 1, 1: 2}  # panel -> objective on its x axis
    limits = {1: -ref[1], 2: ref[2]}  # the reference in the objectives' own units
    for panel, ax in enumerate(axes):
        k = x_index[panel]
        for i, (arm, arm_runs) in enumerate(runs.items()):
            xs = [r["after"][k] for r in arm_runs]
            ys = [r["after"][0] for r in arm_runs]
            marker = "o" if split_arm(arm)[1] == NORMALIZATIONS[0] else "s"
            ax.scatter(xs, ys, color=f"C{i}", marker=marker, label=arm, alpha=0.8)
        ax.scatter([base[k]], [base[0]], color="black", marker="*", s=150, label="base model")
        ax.axhline(ref[0], color="gray", linestyle="--", linewidth=0.8)
        ax.axvline(limits[k], color="gray", linestyle="--", linewidth=0.8, label="reference")
        ax.set_xlabel("mean completion tokens (lower is better)" if k == 1 else "format")
        ax.set_ylabel("correctness")
    axes[1].legend(fontsize=7, loc="best")
    fig.suptitle("final held-out points per run (greedy)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def report(runs: dict, base: list[float], ref: list[float], args) -> None:
    """The tables, the plot and the two ratio lines (the last lines of the output)."""
    for arm, arm_runs in runs.items():
        for seed, r in enumerate(arm_runs):
            pairs = zip(r["before"], base, strict=True)
            if any(abs(a - b) > 1e-6 * max(1.0, abs(b)) for a, b in pairs):
                print(f"warning: {arm} seed {seed}: its base point {r['before']} is not {base}")
    print(f"\nmodel={args.model} steps={args.steps} seeds={args.seeds} set={args.set}")
    print(f"base model (held-out): {fmt(base)}")
    print(f"hypervolume reference (base less {MARGIN}): {fmt([ref[0], -ref[1], ref[2]])}")
    print("final points:")
    means = {}
    for arm, arm_runs in runs.items():
        hvs = [hypervolume([orient(r["after"], MINIMISE)], ref) for r in arm_runs]
        for seed, (r, hv) in enumerate(zip(arm_runs, hvs, strict=True)):
            print(f"  {arm} seed {seed}: {fmt(r['after'])} hv={hv:.4f}")
        means[arm] = (*mean_std(hvs), arm_runs)
    header = f"{'arm':38} {'hv mean':>8} {'hv std':>8} {'correct':>8} {'length':>7} {'format':>7}"
    print(header + f" {'step s':>7}")
    for arm, (mean, std, arm_runs) in means.items():
        point = [statistics.mean(r["after"][k] for r in arm_runs) for k in range(3)]
        step = statistics.median(r["step_s"] for r in arm_runs)
        print(
            f"{arm:38} {mean:8.4f} {std:8.4f} {point[0]:8.3f} {point[1]:7.1f} "
            f"{point[2]:7.3f} {step:7.2f}"
        )
    png = Path(args.out_dir) / "pareto.png"
    plot_pareto(runs, base, ref, png)
    print(f"pareto plot: {png}")
    static = {a: v[0] for a, v in means.items() if split_arm(a)[0] in STATIC}
    dynamic = {a: v[0] for a, v in means.items() if split_arm(a)[0] in DYNAMIC}
    best_dynamic = max(dynamic, key=dynamic.get) if dynamic else None
    best_static = max(static, key=static.get) if static else None
    print(f"best dynamic arm: {best_dynamic}; best static arm: {best_static}")
    top = dynamic[best_dynamic] if best_dynamic else float("nan")
    uniform = static.get("static_uniform", float("nan"))
    print(f"hv_ratio_vs_uniform={ratio(top, uniform):.3f}")
    print(f"hv_ratio_vs_best_static={ratio(top, static.get(best_static, float('nan'))):.3f}")


def ratio(top: float, bottom: float) -> float:
    """top / bottom; inf when only the top arm has any hypervolume, nan when neither has."""
    if bottom > 0:
        return top / bottom
    return float("inf") if top > 0 else float("nan")


def main() -> None:
    args = parse_args()
    if args.measure_base:
        measure_base(args.overrides, Path(args.measure_base))
        return
    out = Path(args.out or tempfile.mkdtemp(prefix="multi-objective-"))
    out.mkdir(parents=True, exist_ok=True)
    check_settings(args, out)
    args.out_dir = out
    model, tiny = args.model, args.model == "tiny"
    if tiny:
        from rlx.models.tiny import build_tiny_model

        model = str(build_tiny_model(out / "tiny"))
    base = base_point(model, out, tiny, args.set)  # before any run: the reference depends on no arm
    ref = reference_point(base)
    runs = {
        arm: [
            run(arm, s, model, args.steps, out / f"{arm}_{s}", tiny, args.set)
            for s in range(args.seeds)
        ]
        for arm in args.arms
    }
    report(runs, base, ref, args)


if __name__ == "__main__":
    main()
