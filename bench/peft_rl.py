"""Off-principal-aware PEFT on the main job at equal wall-clock: full fine-tuning, LoRA, PiSSA, the
minor-component init and LoRA + the principal guard, by held-out gain and where the update went.

    .venv/bin/python bench/peft_rl.py                       # smollm2, recipes/grpo.yaml, 2 seeds
    .venv/bin/python bench/peft_rl.py --variants full lora lora_sync     # the two syncs side by side
    .venv/bin/python bench/peft_rl.py --model tiny --steps 2 --seeds 1   # smoke test (3-4 min)

Every run is recipes/grpo.yaml (GRPO on two-digit addition, held-out correctness before and after
training) with the same `max_run_minutes` (equal wall-clock: a slower variant runs fewer steps);
the variants differ only in `adapter.*` and the learning rate (the recipe's 3e-5 for full
fine-tuning, --adapter-lr for the adapters, which start at or near zero and need a larger step):

    full        adapter.method=none
    lora        adapter.method=lora (rank 16, alpha 32)
    pissa       adapter.method=pissa: starts on the top-16 singular triplets (the paper's
                counter-example: it trains the principal directions RLVR avoids)
    minor       adapter.method=minor: starts on the 16 smallest singular triplets
    lora_guard  adapter.method=lora + adapter.principal_guard=16
    lora_sync   lora with adapter.sync=adapter (vLLM LoRA requests; optional: the sync speed)

Per variant, mean over seeds: held-out gain (eval.json after - before, reward_mean = correctness),
steps run, the median step, weight-sync and after-step hook times (metrics.jsonl, first step left
out; the hooks are the principal guard's projections: its cost per step), and the
spectral diagnostics of the final model against the base (rlx.adapters.diagnostics, top-16, the
"all" row of `rlx diagnose`: alignment, principal share, rotation, spectral drift, bf16 sparsity).
Last line: `off_principal_vs_lora=<best gain of minor, lora_guard / gain of lora>` (goal >= 1).
Run it on an idle machine: anything beside it slows vLLM-CPU by up to 10x. With --out, a run
already finished there is read back (result.json), not run again; its checkpoints are deleted
once measured (up to 2 GB a run; final/ stays).
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
    "lora_sync": [
        "adapter.method=lora",
        *ADAPTER,
        "adapter.sync=adapter",
        "rollout.enable_lora=true",
        f"rollout.max_lora_rank={RANK}",
    ],
}
DEFAULT_VARIANTS = ["full", "lora", "pissa", "minor", "lora_guard"]
OFF_PRINCIPAL = ("minor", "lora_guard")
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


def mean(values) -> float:
    values = list(values)
    return statistics.mean(values) if values else math.nan


def main() -> None:
    args = parse_args()
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

    print(f"\nmodel={args.model} seeds={args.seeds} max_run_minutes={args.minutes}")
    before = mean(r["before"] for rs in runs.values() for r in rs)
    print(f"held-out reward before training: {before:.3f}")
    head = f"{'variant':11} {'gain':>7} {'std':>6} {'steps':>6} {'step s':>7} {'sync s':>7}"
    head += f" {'hooks s':>7}"
    print(head + "".join(f" {m:>12}" for m in SHORT))
    gains = {}
    for variant, rs in runs.items():
        gains[variant] = mean(r["gain"] for r in rs)
        std = statistics.stdev(r["gain"] for r in rs) if len(rs) > 1 else 0.0
        line = f"{variant:11} {gains[variant]:+7.3f} {std:6.3f} {mean(r['steps'] for r in rs):6.1f}"
        line += f" {mean(r['step_s'] for r in rs):7.2f} {mean(r['sync_s'] for r in rs):7.3f}"
        line += f" {mean(r['hooks_s'] for r in rs):7.3f}"
        print(line + "".join(f" {mean(r[m] for r in rs):12.4g}" for m in DIAG))
    best = max((gains[v] for v in OFF_PRINCIPAL if v in gains), default=math.nan)
    lora = gains.get("lora", math.nan)
    ratio = best / lora if lora and lora > 0 else math.nan
    print(f"off_principal_vs_lora={ratio:.3f}")


if __name__ == "__main__":
    main()
