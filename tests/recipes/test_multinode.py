"""Multi-node launch on loopback: two "machines" (accelerate --num_machines 2, machine ranks 0 and 1
on 127.0.0.1) of one trainer process each train exactly like two processes on one machine."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file
from torch.distributed.elastic.utils.distributed import get_free_port

from rlx.metrics import read_metrics

ROOT = Path(__file__).resolve().parents[2]
ACCELERATE = [sys.executable, "-m", "accelerate.commands.launch", "--config_file"]


def recipe_args(model: str, reward: Path, out: Path) -> list[str]:
    args = [str(ROOT / "recipes" / "pg.py"), "--config", str(ROOT / "recipes" / "reinforce.yaml")]
    args += [f"model.name={model}", "rollout.dtype=float32", "rollout.max_new_tokens=12"]
    args += ["rollout.num_samples=2", "prompts_per_step=4", "micro_batch_size=4", "steps=3"]
    args += ["eval.enabled=false", "log_with=[]", "optim.lr=1e-3", "bf16_autocast=false"]
    rewards = json.dumps([{"func": f"{reward}:longer", "weight": 1.0}])
    return args + [f"output_dir={out}", f"rewards={rewards}", "max_run_minutes=0"]


@pytest.mark.multiprocess
def test_two_machines_on_loopback_train_like_two_processes(tiny_llama, tmp_path):
    reward = tmp_path / "length.py"
    reward.write_text(
        "def longer(prompts, completions, **kw):\n"
        "    return [min(len(c), 40) / 40 for c in completions]\n"
    )
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    one_machine = ACCELERATE + [str(ROOT / "launch" / "cpu_2proc.yaml")]
    one_machine += ["--main_process_port", str(get_free_port())]
    run = subprocess.run(
        one_machine + recipe_args(tiny_llama, reward, tmp_path / "one"),
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]

    port = str(get_free_port())
    machines = []
    for machine_rank in (0, 1):
        cmd = ACCELERATE + [str(ROOT / "launch" / "multinode_cpu.yaml"), "--num_machines", "2"]
        cmd += ["--num_processes", "2", "--machine_rank", str(machine_rank)]
        cmd += ["--main_process_ip", "127.0.0.1", "--main_process_port", port]
        log = open(tmp_path / f"machine{machine_rank}.log", "w")  # noqa: SIM115 - closed below
        cmd += recipe_args(tiny_llama, reward, tmp_path / "two")
        machines.append((subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=log), log))
    for proc, log in machines:
        code = proc.wait(timeout=600)
        log.close()
        assert code == 0, (tmp_path / "machine0.log").read_text()[-3000:]

    a, b = (
        read_metrics(tmp_path / "one" / "metrics.jsonl"),
        read_metrics(tmp_path / "two" / "metrics.jsonl"),
    )
    assert [r["step"] for r in b] == [1, 2, 3]
    for ra, rb in zip(a, b, strict=True):
        assert ra["reward_mean"] == rb["reward_mean"], ra["step"]
        assert ra["loss"] == pytest.approx(rb["loss"], abs=1e-4), ra["step"]
        assert ra["grad_norm"] > 0
    wa = load_file(tmp_path / "one" / "final" / "model.safetensors")
    wb = load_file(tmp_path / "two" / "final" / "model.safetensors")
    assert max((wa[k] - wb[k]).abs().max().item() for k in wa) < 1e-6
