"""Scale-out costs of recipes/pg.py on this machine: step time, weight-sync time and peak memory for
(a) one process with the in-process vLLM engine, (b) two trainer processes sampling from one
rollout server (`rlx serve`, weights pushed over the rlx_gloo weight-transfer engine), and two
processes under DDP, DeepSpeed ZeRO-2 and ZeRO-3 (accelerate launch, gloo on CPU; every rank syncs
its own in-process engine).

    .venv/bin/python bench/scale.py                    # tiny random model, 6 steps per case
    .venv/bin/python bench/scale.py --model smollm2 --steps 6

Per case: the median step time and sync time over the steps after the first (warm-up), the sync's
share of the step, and the largest peak RSS of any rank (`peak_rss_gib` in metrics.jsonl; under
ZeRO-3 the sync gathers rlx.sharding.CHUNK_ELEMENTS weights at a time; with a server, its
processes' peak RSS is shown apart). The last line is `sync_share=<sync / step time>` of case (b)
(of the first case run, with --cases). Run it on an idle machine: anything beside it slows vLLM-CPU
by up to 10x.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import requests
from torch.distributed.elastic.utils.distributed import get_free_port

ROOT = Path(__file__).resolve().parent.parent
SERVER = "server"  # case (b): cpu_2proc.yaml with rollout.backend=server
CASES = {
    "1 process, in-process engine": None,
    "2 trainers + 1 rollout server": SERVER,
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
        help="which cases to run (0-4, table order)",
    )
    return p.parse_args()


def run_case(config: str | None, model: str, steps: int, out: Path) -> dict:
    server = start_server(model, out / "server.log") if config == SERVER else None
    cmd = [sys.executable]
    if config is not None:
        launch = "cpu_2proc.yaml" if config == SERVER else config
        cmd += ["-m", "accelerate.commands.launch", "--config_file", str(ROOT / "launch" / launch)]
        cmd += ["--main_process_port", str(get_free_port())]
    cmd += [str(ROOT / "recipes" / "pg.py"), "--config", str(ROOT / "recipes" / "grpo.yaml")]
    cmd += [f"model.name={model}", f"steps={steps}", "eval.enabled=false", "log_with=[]"]
    cmd += ["max_run_minutes=0", "algo.dynamic_sampling=false", f"output_dir={out}"]
    if server is not None:
        cmd += ["rollout.backend=server", f"rollout.servers=[{server[0]}]"]
    try:
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        server_peak = peak_rss_gib_of_tree(server[1].pid) if server else float("nan")
    finally:
        if server is not None:
            os.killpg(server[1].pid, signal.SIGTERM)
            server[1].wait()
    if proc.returncode != 0:
        raise SystemExit(f"{config or 'one process'} failed:\n{proc.stderr[-3000:]}")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows[1:] if "time_sync_s" in r]  # after the warm-up step
    step = statistics.median(r["step_time_s"] for r in rows)
    sync = statistics.median(r["time_sync_s"] for r in rows)
    peak = max(r.get("peak_rss_gib", float("nan")) for r in rows)
    return {"step": step, "sync": sync, "share": sync / step, "peak": peak, "server": server_peak}


def start_server(model: str, log: Path) -> tuple[str, subprocess.Popen]:
    """`rlx serve` for `model` with grpo.yaml's rollout settings; waits until it answers."""
    port = get_free_port()
    cmd = [
        sys.executable,
        "-m",
        "rlx.cli",
        "serve",
        "--config",
        str(ROOT / "recipes" / "grpo.yaml"),
    ]
    cmd += [f"model.name={model}", f"port={port}"]
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=out, start_new_session=True)
    for _ in range(600):
        try:
            if requests.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return f"127.0.0.1:{port}", proc
        except requests.RequestException:
            pass
        if proc.poll() is not None:
            break
        time.sleep(1)
    os.killpg(proc.pid, signal.SIGKILL)
    raise SystemExit(f"rlx serve did not start:\n{log.read_text()[-3000:]}")


def peak_rss_gib_of_tree(pid: int) -> float:
    """The largest peak RSS (VmHWM) of a process and its descendants (the server's API process,
    engine core and worker), in GiB."""
    import psutil

    root = psutil.Process(pid)
    peaks = []
    for proc in [root, *root.children(recursive=True)]:
        status = Path(f"/proc/{proc.pid}/status").read_text()
        kib = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmHWM"))
        peaks.append(kib / 2**20)
    return max(peaks)


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
    head = f"{'case':32} {'step s':>8} {'sync s':>8} {'sync share':>11} {'peak RSS GiB':>13}"
    print(head + f" {'server GiB':>11}")
    for name, r in results.items():
        row = f"{name:32} {r['step']:8.2f} {r['sync']:8.3f} {r['share']:11.3f} {r['peak']:13.2f}"
        print(row + f" {r['server']:11.2f}")
    served = results.get("2 trainers + 1 rollout server") or results[next(iter(results))]
    print(f"sync_share={served['share']:.3f}")  # of case (b) when it ran


if __name__ == "__main__":
    main()
