"""Off-principal-aware PEFT on the main job at equal wall-clock: full fine-tuning, LoRA, LoRA + the
principal guard (with and without gradient projection) and the minor-component init, by held-out
gain on the trained task and by what they forget of tasks the run never trains on.

    .venv/bin/python bench/peft_rl.py                       # smollm2, recipes/grpo.yaml, 2 seeds
    .venv/bin/python bench/peft_rl.py --variants full lora lora_sync     # the two syncs side by side
    .venv/bin/python bench/peft_rl.py --model tiny --steps 2 --seeds 1   # smoke test (3-4 min)

Every run is recipes/grpo.yaml (GRPO on two-digit addition, held-out correctness before and after
training) with the same `max_run_minutes` (equal wall-clock: a slower variant runs fewer steps);
the variants differ only in `adapter.*` and the learning rate (the recipe's 3e-5 for full
fine-tuning, --adapter-lr for the adapters, which start at or near zero and need a larger step):

    full             adapter.method=none
    lora             adapter.method=lora (rank 16, alpha 32)
    lora_guard       adapter.method=lora + adapter.principal_guard=16
    lora_guard_grad  lora_guard + adapter.guard_gradient=true (AdamW sees projected gradients)
    minor            adapter.method=minor: starts on the 16 smallest singular triplets
    pissa            adapter.method=pissa: starts on the top-16 singular triplets (optional; the
                     paper's counter-example: it trains the principal directions RLVR avoids)
    lora_sync        lora with adapter.sync=adapter (optional: vLLM LoRA requests, the sync speed)

Forgetting (what the seed paper predicts the guard buys): the base model and every run's final
model are scored (greedy, correctness, `rlx eval`) on tasks the runs never train on, UNTRAINED:
sums and differences to 20, differences of two-digit numbers, and products of numbers to 12 (the
runs train on two-digit sums only). A variant's forgetting loss is the drop of its mean untrained
score, max(0, before - after), over seeds.

Per variant, mean over seeds: held-out gain (eval.json after - before, reward_mean = correctness),
the change on each untrained task, steps run, the median step, weight-sync and after-step hook
times (metrics.jsonl, first step left out; the hooks are the principal guard's projections: its
cost per step), and the spectral diagnostics of the final model against the base
(rlx.adapters.diagnostics, top-16, the "all" row of `rlx diagnose`: alignment, principal share,
rotation, spectral drift, bf16 sparsity). Last lines:
`forgetting_ratio=<smallest forgetting loss of the off-principal variants / lora's>` (goal <= 0.5
with the trained-task gain within noise of LoRA's; nan when LoRA forgets nothing) and
`off_principal_vs_lora=<best gain of the off-principal variants / gain of lora>` (goal >= 1).
Run it on an idle machine: anything beside it slows vLLM-CPU by up to 10x. With --out, a run
already finished there is read back (result.json), not run again; its checkpoints are deleted
once measured (up to 2 GB a run; final/ stays), and each model's untrained-task scores are kept
in untrained/<run>.json (base.json for the base model): added seeds or variants score only the
new runs.
"""

from __future__ import annotations

import argparse
import contextlib
import io
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

RANK, TOP_K = 16, 16
ADAPTER = [f"adapter.rank={RANK}", "adapter.alpha=32"]
VARIANTS = {
    "full": ["adapter.method=none"],
    "lora": ["adapter.method=lora", *ADAPTER],
    "pissa": ["adapter.method=pissa", *ADAPTER],
    "minor": ["adapter.method=minor", *ADAPTER],
    "lora_guard": ["adapter.method=lora", *ADAPTER, f"adapter.principal_guard={TOP_K}"],
    "lora_guard_grad": [
        "adapter.method=lora",
        *ADAPTER,
        f"adapter.principal_guard={TOP_K}",
        "adapter.guard_gradient=true",
    ],
    "lora_sync": [
        "adapter.method=lora",
        *ADAPTER,
        "adapter.sync=adapter",
        "rollout.enable_lora=true",
        f"rollout.max_lora_rank={RANK}",
    ],
}
DEFAULT_VARIANTS = ["full", "lora", "lora_guard", "lora_guard_grad", "minor"]
OFF_PRINCIPAL = ("minor", "lora_guard", "lora_guard_grad")
# tasks the runs never train on (recipes/grpo.yaml trains on two-digit sums): arithmetic options
UNTRAINED = {
    "small": {"one_shot": True, "max_operand": 20, "ops": ["+", "-"]},  # sums, differences to 20
    "minus": {"one_shot": True, "max_operand": 99, "ops": ["-"]},  # two-digit differences
    "times": {"one_shot": True, "max_operand": 12, "ops": ["*"]},  # the times tables to 12
}
TRAINED_REWARD = "rewards/arithmetic.py:correctness"  # recipes/grpo.yaml's
UNTRAINED_PROMPTS = 200
DIAG = ("alignment", "principal_share", "rotation_deg", "spectral_drift", "bf16_sparsity")
SHORT = ("align", "princ_share", "rotation_deg", "drift", "bf16_sparse")
# a tiny random model never answers correctly (no signal): it is rewarded for longer text instead
TINY_REWARD = (
    "def longer(prompts, completions, **kw):\n"
    "    return [min(len(c), 40) / 40 for c in completions]\n"
)
TINY = [  # a tiny random model: small batches, short completions, fp32 engine, 8 eval prompts
    "rollout.num_samples=4",
    "prompts_per_step=4",
    "rollout.max_new_tokens=12",
    "eval.max_new_tokens=12",
    "eval.num_prompts=8",
    "micro_batch_size=16",
    "rollout.dtype=float32",
]


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2", help='alias, folder or "tiny"')
    p.add_argument("--seeds", type=int, default=2, help="runs per variant (seeds 0..n-1)")
    p.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=DEFAULT_VARIANTS)
    p.add_argument("--minutes", type=float, default=9.5, help="max_run_minutes of every run")
    p.add_argument("--steps", type=int, default=None, help="steps (default: the recipe's 60)")
    p.add_argument("--adapter-lr", type=float, default=3e-4, help="optim.lr of the adapters")
    p.add_argument("--out", default=None, help="keep the runs here (default: a temporary folder)")
    p.add_argument("--score", default=None, help=argparse.SUPPRESS)  # score_main's subprocess
    p.add_argument("--score-json", default=None, help=argparse.SUPPRESS)
    return p.parse_args()


def run(variant: str, seed: int, model: str, args, out: Path) -> dict:
    """One training run: its held-out gain, step and sync times, and final-model diagnostics."""
    if (out / "result.json").exists():  # finished by an earlier call with the same --out
        return json.loads((out / "result.json").read_text())
    cmd = [sys.executable, str(ROOT / "recipes" / "pg.py")]
    cmd += ["--config", str(ROOT / "recipes" / "grpo.yaml"), *VARIANTS[variant]]
    cmd += [f"model.name={model}", f"seed={seed}", f"rollout.seed={seed}", "log_with=[]"]
    cmd += [f"max_run_minutes={args.minutes}", f"output_dir={out}", "overwrite_output_dir=true"]
    cmd += [f"steps={args.steps}"] if args.steps else []
    cmd += [f"optim.lr={args.adapter_lr}"] if variant != "full" else []
    if args.model == "tiny":
        cmd += [*TINY, f"rewards=[{{func: '{out.parent / 'tiny_reward.py'}:longer', weight: 1.0}}]"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{variant} seed {seed} failed:\n{proc.stderr[-3000:]}")
    results = json.loads((out / "eval.json").read_text())
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if r.get("step_time_s") is not None]
    timed = rows[1:] or rows  # the first step warms up
    before, after = results["before"]["reward_mean"], results["after"]["reward_mean"]
    result = {
        "before": before,
        "gain": after - before,
        "steps": results.get("steps", len(rows)),
        "step_s": statistics.median(r["step_time_s"] for r in timed),
        "sync_s": statistics.median(r["time_sync_s"] for r in timed),
        "hooks_s": statistics.median(r.get("time_adapter_hooks_s", 0.0) for r in timed),
    } | final_diagnostics(model, out)
    shutil.rmtree(out / "checkpoints", ignore_errors=True)  # optimizer state: 1.6 GB a full run
    (out / "result.json").write_text(json.dumps(result))
    return result


def final_diagnostics(model: str, out: Path) -> dict:
    """The "all" row of rlx diagnose (final model vs base, top-16), its table kept quiet."""
    from rlx.cli.diagnose import diagnose

    with contextlib.redirect_stdout(io.StringIO()):
        result = diagnose(model, str(out / "final"), TOP_K, str(out / "diagnose"), progress=False)
    return {m: result["summary"]["all"][m] for m in DIAG}


def score_untrained(models: dict[str, str], args, tmp: Path) -> dict[str, dict[str, float]]:
    """{model: {task: held-out reward}} on each UNTRAINED task, greedy, with the runs' reward
    (correctness; the tiny model: its length reward), for models = {label: model}. One subprocess
    per model (one vLLM engine for all the tasks; the tiny model: the HF engine), kept in
    tmp/untrained/<label>.json."""
    scores = {}
    (tmp / "untrained").mkdir(exist_ok=True)
    for label, name in models.items():
        path = tmp / "untrained" / f"{label}.json"
        saved = json.loads(path.read_text()) if path.exists() else {}
        if saved.get("model") != name:
            cmd = [sys.executable, __file__, "--model", args.model, "--score", name]
            cmd += ["--score-json", str(path), "--out", str(tmp)]
            proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
            if proc.returncode != 0:
                raise SystemExit(f"scoring {name} failed:\n{proc.stderr[-3000:]}")
            saved = json.loads(path.read_text())
        scores[name] = saved["scores"]
    return scores


def score_main(args) -> None:
    """--score MODEL --score-json PATH: the model's reward on every UNTRAINED task, as JSON."""
    from rlx.config import RewardConfig, RolloutConfig, TaskConfig
    from rlx.evaluation import evaluate
    from rlx.rewards import resolve_rewards
    from rlx.rollout import make_engine
    from rlx.tasks import load_task_dataset

    tiny = args.model == "tiny"
    func = f"{Path(args.out) / 'tiny_reward.py'}:longer" if tiny else TRAINED_REWARD
    reward_fns = resolve_rewards("arithmetic", [RewardConfig(func=func, weight=1.0)])
    # the tiny smoke test scores on the HF engine: no vLLM engine to start per model
    backend, rollout = ("hf", RolloutConfig(dtype="float32")) if tiny else ("vllm", RolloutConfig())
    engine = make_engine(backend, args.score, rollout)
    scores = {}
    for task, options in UNTRAINED.items():
        t = TaskConfig(
            name="arithmetic", split="test", num_prompts=8 if tiny else UNTRAINED_PROMPTS
        )
        data = load_task_dataset(t.name, t.split, t.num_prompts, t.seed, **options)
        tokens = 12 if tiny else 48
        scores[task] = evaluate(engine, data, reward_fns, tokens, ["</answer>"])["reward_mean"]
    engine.close()
    Path(args.score_json).write_text(json.dumps({"model": args.score, "scores": scores}))


def forgetting(before: dict[str, float], after: dict[str, float]) -> float:
    """The drop of the mean untrained-task score, max(0, before - after) (0: nothing forgotten)."""
    return max(0.0, mean(before.values()) - mean(after.values()))


def mean(values) -> float:
    values = list(values)
    return statistics.mean(values) if values else math.nan


def main() -> None:
    args = parse_args()
    if args.score:
        return score_main(args)
    tmp = Path(args.out or tempfile.mkdtemp(prefix="peft-rl-"))
    model = args.model
    if model == "tiny":
        from rlx.models.tiny import build_tiny_model

        model = str(build_tiny_model(tmp / "tiny"))
        (tmp / "tiny_reward.py").write_text(TINY_REWARD)
    runs = {}
    for variant in args.variants:
        runs[variant] = []
        for seed in range(args.seeds):
            runs[variant].append(run(variant, seed, model, args, tmp / f"{variant}_{seed}"))
            r = runs[variant][-1]
            print(f"{variant} seed {seed}: gain {r['gain']:+.3f} in {r['steps']} steps", flush=True)

    finals = {v: [str(tmp / f"{v}_{seed}" / "final") for seed in range(args.seeds)] for v in runs}
    labelled = {"base": model} | {Path(f).parent.name: f for fs in finals.values() for f in fs}
    untrained = score_untrained(labelled, args, tmp)
    base = untrained[model]

    print(f"\nmodel={args.model} seeds={args.seeds} max_run_minutes={args.minutes}")
    before = mean(r["before"] for rs in runs.values() for r in rs)
    print(f"held-out reward before training: {before:.3f}")
    print("untrained tasks before training: " + ", ".join(f"{t} {v:.3f}" for t, v in base.items()))
    head = f"{'variant':15} {'gain':>7} {'std':>6}" + "".join(f" {t + ' chg':>10}" for t in base)
    head += f" {'forget':>7} {'steps':>6} {'step s':>7} {'sync s':>7} {'hooks s':>7}"
    print(head + "".join(f" {m:>12}" for m in SHORT))
    gains, losses = {}, {}
    for variant, rs in runs.items():
        gains[variant] = mean(r["gain"] for r in rs)
        std = statistics.stdev(r["gain"] for r in rs) if len(rs) > 1 else 0.0
        after = {t: mean(untrained[f][t] for f in finals[variant]) for t in base}
        losses[variant] = forgetting(base, after)
        line = f"{variant:15} {gains[variant]:+7.3f} {std:6.3f}"
        line += "".join(f" {after[t] - base[t]:+10.3f}" for t in base)
        line += f" {losses[variant]:7.3f} {mean(r['steps'] for r in rs):6.1f}"
        line += f" {mean(r['step_s'] for r in rs):7.2f} {mean(r['sync_s'] for r in rs):7.3f}"
        line += f" {mean(r['hooks_s'] for r in rs):7.3f}"
        print(line + "".join(f" {mean(r[m] for r in rs):12.4g}" for m in DIAG))
    least = min((losses[v] for v in OFF_PRINCIPAL if v in losses), default=math.nan)
    lora_loss = losses.get("lora", math.nan)
    print(f"forgetting_ratio={least / lora_loss if lora_loss > 0 else math.nan:.3f}")
    best = max((gains[v] for v in OFF_PRINCIPAL if v in gains), default=math.nan)
    lora = gains.get("lora", math.nan)
    ratio = best / lora if lora and lora > 0 else math.nan
    print(f"off_principal_vs_lora={ratio:.3f}")


if __name__ == "__main__":
    main()
