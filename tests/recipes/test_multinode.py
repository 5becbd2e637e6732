"""Multi-node launch on loopback: two "machines" (accelerate --num_machines 2, machine ranks 0 and 1
on 127.0.0.1) of one trainer process each train exactly like two processes on one machine, and,
sampling from one rollout server (`rlx serve`), like one process with its in-process engine."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch.distributed.elastic.utils.distributed import get_free_port
from transformers import AutoModelForCausalLM

from rlx.metrics import read_metrics
from rlx.rollout.server import ServerEngine

ROOT = Path(__file__).resolve().parents[2]
ACCELERATE = [sys.executable, "-m", "accelerate.commands.launch", "--config_file"]


def recipe_args(model: str, reward: Path, out: Path) -> list[str]:
    args = [str(ROOT / "recipes" / "pg.py"), "--config", str(ROOT / "recipes" / "reinforce.yaml")]
    args += [f"model.name={model}", "rollout.dtype=float32", "rollout.max_new_tokens=12"]
    args += ["rollout.num_samples=2", "prompts_per_step=4", "micro_batch_size=4", "steps=3"]
    args += ["eval.enabled=false", "log_with=[]", "optim.lr=1e-3", "bf16_autocast=false"]
    rewards = json.dumps([{"func": f"{reward}:longer", "weight": 1.0}])
    return args + [f"output_dir={out}", f"rewards={rewards}", "max_run_minutes=0"]


@pytest.mark.slow  # two 2-process launches: the suite's 15-minute budget on an AVX2 CPU
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

    launch_machines(recipe_args(tiny_llama, reward, tmp_path / "two"), tmp_path, env)

    a = same_steps(tmp_path / "one", tmp_path / "two")
    assert all(r["grad_norm"] > 0 for r in a)
    wa = load_file(tmp_path / "one" / "final" / "model.safetensors")
    wb = load_file(tmp_path / "two" / "final" / "model.safetensors")
    assert max((wa[k] - wb[k]).abs().max().item() for k in wa) < 1e-6


def same_steps(one: Path, two: Path) -> list[dict]:
    """Both runs' 3 steps have the same rewards (exactly) and losses (1e-4); one's metrics."""
    a, b = read_metrics(one / "metrics.jsonl"), read_metrics(two / "metrics.jsonl")
    assert [r["step"] for r in b] == [1, 2, 3]
    for ra, rb in zip(a, b, strict=True):
        assert ra["reward_mean"] == rb["reward_mean"], ra["step"]
        assert ra["loss"] == pytest.approx(rb["loss"], abs=1e-4), ra["step"]
    return a


def launch_machines(args: list[str], log_dir: Path, env: dict) -> None:
    """Two "machines" of one trainer process each on loopback; fails with machine 0's log."""
    port = str(get_free_port())
    machines = []
    for machine_rank in (0, 1):
        cmd = ACCELERATE + [str(ROOT / "launch" / "multinode_cpu.yaml"), "--num_machines", "2"]
        cmd += ["--num_processes", "2", "--machine_rank", str(machine_rank)]
        cmd += ["--main_process_ip", "127.0.0.1", "--main_process_port", port]
        log = open(log_dir / f"machine{machine_rank}.log", "w")  # noqa: SIM115 - closed below
        machines.append(
            (subprocess.Popen(cmd + args, cwd=ROOT, env=env, stdout=log, stderr=log), log)
        )
    for proc, log in machines:
        code = proc.wait(timeout=600)
        log.close()
        assert code == 0, (log_dir / "machine0.log").read_text()[-3000:]


@pytest.mark.multiprocess
def test_two_machines_and_a_rollout_server_train_like_one_process(
    tiny_tied, rollout_server, tmp_path
):
    """Greedy rollouts (a server cannot be reseeded per step): the same per-step rewards and
    losses. Greedy sampling has no policy gradient (every sampled token has probability 1 at
    temperature 0), so the weights move only by AdamW's weight decay; the check that the sync
    works is that the server ends with the trainer's final weights (fp32 logprobs, 1e-4)."""
    # recipe_args scores with `longer`. A random tiny model's greedy completions start alike, so
    # the reward has a prompt-dependent part (non-zero advantages from step 1) and a part that
    # changes once the updated weights change the completions.
    reward = tmp_path / "length.py"
    reward.write_text(
        "def longer(prompts, completions, **kw):\n"
        "    return [len(str(p)) % 5 / 5 + len(set(c)) / max(len(c), 1)\n"
        "            for p, c in zip(prompts, completions)]\n"
    )
    greedy = ["rollout.temperature=0", "rollout.num_samples=1", "algo.learner=reinforce"]
    greedy += ["algo.dynamic_sampling=false", "algo.kl_beta=0", "optim.weight_decay=0.5"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    one = recipe_args(tiny_tied, reward, tmp_path / "one") + greedy
    run = subprocess.run(
        [sys.executable, *one], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]

    server = [
        "rollout.backend=server",
        f"rollout.servers=[{rollout_server[0]}]",
        "rollout.timeout_s=120",
    ]
    launch_machines(
        recipe_args(tiny_tied, reward, tmp_path / "two") + greedy + server, tmp_path, env
    )

    a = same_steps(tmp_path / "one", tmp_path / "two")
    assert len({r["reward_mean"] for r in a}) > 1, "rewards should vary between steps"

    final = AutoModelForCausalLM.from_pretrained(tmp_path / "two" / "final", dtype=torch.float32)
    start = AutoModelForCausalLM.from_pretrained(tiny_tied, dtype=torch.float32)
    tokens = [1, 57, 210, 33, 99, 140, 260, 301, 12, 88]
    ref, before = (hf_prompt_logprobs(m, tokens) for m in (final, start))
    assert (ref - before).abs().max() > 1e-5, "the run should have moved the weights"
    engine = ServerEngine(tiny_tied, [rollout_server[0]], timeout_s=60)
    served = torch.tensor(engine.prompt_logprobs([tokens])[0])
    engine.close()
    assert (served - ref).abs().max() <= 1e-4


def hf_prompt_logprobs(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0, :-1]
    return torch.log_softmax(logits, -1).gather(-1, torch.tensor(ids[1:])[:, None])[:, 0]


def test_slurm_script_puts_servers_and_trainers_on_their_own_nodes(tmp_path):
    """launch/slurm_pg.sbatch with stand-ins for scontrol and srun: ROLLOUT_NODES=1 of 3 nodes
    serves (the recipe's config and rollout overrides only), the other two train against it."""
    for name, body in {
        "scontrol": "printf 'n1\\nn2\\nn3\\n'",
        # the servers' srun runs in the background and the script's exit kills it: the
        # trainers' srun (the last) waits up to 10 s for its line, so the log has both
        "srun": 'echo "$* token=${RLX_SERVE_TOKEN:-none}" >> "$SRUN_LOG"\n'
        '[[ $* == *"rlx.cli serve"* ]] || for _ in {1..100}; do\n'
        '  (($(wc -l < "$SRUN_LOG") >= ROLLOUT_NODES + 1)) && break; sleep 0.1; done',
    }.items():
        (tmp_path / name).write_text(f"#!/bin/bash\n{body}\n")
        (tmp_path / name).chmod(0o755)
    log = tmp_path / "srun.log"
    env = {**os.environ, "PATH": f"{tmp_path}:{os.environ['PATH']}", "SRUN_LOG": str(log)}
    env |= {"SLURM_JOB_NODELIST": "n[1-3]", "ROLLOUT_NODES": "1"}
    env.pop("RLX_SERVE_TOKEN", None)  # the script makes one for the job
    args = ["--config", "recipes/grpo.yaml", "output_dir=/shared/x", "rollout.dtype=float32"]
    run = subprocess.run(
        ["bash", str(ROOT / "launch" / "slurm_pg.sbatch"), *args], env=env, cwd=ROOT, text=True
    )
    assert run.returncode == 0
    serve, train = sorted(
        log.read_text().splitlines(), key=lambda line: "rlx.cli serve" not in line
    )
    assert "--nodelist=n1 " in serve and "rlx.cli serve --config recipes/grpo.yaml" in serve
    assert "rollout.dtype=float32" in serve and "output_dir" not in serve
    assert "--nodelist=n2,n3" in train and "--num_machines 2" in train
    assert "--main_process_ip n2" in train and "rollout.backend=server" in train
    assert "rollout.servers=\\[n1:8000\\]" in train and "rollout.sync_address=n2" in train
    # servers bind 0.0.0.0: both sides get one random token, through the environment only
    tokens = {line.rsplit(" token=", 1)[1] for line in (serve, train)}
    assert len(tokens) == 1 and len(token := tokens.pop()) == 64
    assert all(line.count(token) == 1 for line in (serve, train))
    env["ROLLOUT_NODES"] = "3"
    none_left = subprocess.run(
        ["bash", str(ROOT / "launch" / "slurm_pg.sbatch")], env=env, capture_output=True, text=True
    )
    assert none_left.returncode == 2 and "leaves no node" in none_left.stderr
