"""Scale-out costs of recipes/pg.py on this machine: step time, weight-sync time and peak memory for
one process with the in-process vLLM engine, and for two processes under DDP, DeepSpeed ZeRO-2 and
ZeRO-3 (accelerate launch, gloo on CPU; every rank syncs its own in-process engine).

    .venv/bin/python bench/scale.py                    # tiny random model, 6 steps per case
    .venv/bin/python bench/scale.py --model smollm2 --steps 6

Per case: the median step time and sync time over the steps after the first (warm-up), the sync's
share of the step, and the largest peak RSS of any rank (`peak_rss_gib` in metrics.jsonl; under
ZeRO-3 the sync gathers rlx.sharding.CHUNK_ELEMENTS weights at a time). The last line is
`sync_share=<sync / step time>` of the one-process case (of the first case run, with --cases). Rollout workers in their own processes
are not in rlx yet, so the two-trainers-plus-one-worker case is not measured. Run it on an idle
machine: anything beside it slows vLLM-CPU by up to 10x.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from torch.distributed.elastic.utils.distributed import get_free_port

ROOT = Path(__file__).resolve().parent.parent
CASES = {
    "1 process, in-process engine": None,
    "2 processes, DDP": "cpu_2proc.yaml",
    "2 processes, ZeRO-2": "cpu_2proc_zero2.yaml",
    "2 processes, ZeRO-3": "cpu_2proc_zero3.yaml",
}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="tiny", help='alias, folder or "tiny"')
    p.add_argument("--steps", type=int, default=6)
    p.add_argument(
        "--cases",
        nargs="+",
        type=int,
        choices=range(len(CASES)),
        default=list(range(len(CASES))),
        help="which cases to run (0-3, table order)",
    )
    return p.parse_args()


def run_case(config: str | None, model: str, steps: int, out: Path) -> dict:
    cmd = [sys.executable]
    if config is not None:
        cmd += ["-m", "accelerate.commands.launch", "--config_file", str(ROOT / "launch" / config)]
        cmd += ["--main_process_port", str(get_free_port())]
    cmd += [str(ROOT / "recipes" / "pg.py"), "--config", str(ROOT / "recipes" / "grpo.yaml")]
    cmd += [f"model.name={model}", f"steps={steps}", "eval.enabled=false", "log_with=[]"]
    cmd += ["max_run_minutes=0", "algo.dynamic_sampling=false", f"output_dir={out}"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{config or 'one process'} failed:\n{proc.stderr[-3000:]}")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows[1:] if "time_sync_s" in r]  # after the warm-up step
    step = statistics.median(r["step_time_s"] for r in rows)
    sync = statistics.median(r["time_sync_s"] for r in rows)
    peak = max(r.get("peak_rss_gib", float("nan")) for r in rows)
    return {"step": step, "sync": sync, "share": sync / step, "peak": peak}


def main() -> None:
    args = parse_args()
    from rlx.models.tiny import build_tiny_model

    tmp = Path(tempfile.mkdtemp(prefix="scale-"))
    model = str(build_tiny_model(tmp / "tiny")) if args.model == "tiny" else args.model
    results = {}
    for i, (name, config) in enumerate(CASES.items()):
        if i in args.cases:
            results[name] = run_case(config, model, args.steps, tmp / f"case{i}")
    print(f"\nmodel={args.model} steps={args.steps} (medians after the first step)")
    print(f"{'case':32} {'step s':>8} {'sync s':>8} {'sync share':>11} {'peak RSS GiB':>13}")
    for name, r in results.items():
        print(f"{name:32} {r['step']:8.2f} {r['sync']:8.3f} {r['share']:11.3f} {r['peak']:13.2f}")
    first = results[next(iter(results))]
    print(f"sync_share={first['share']:.3f}")  # of the one-process case when it ran


if __name__ == "__main__":
    main()
