"""recipes/pg.py with ranks that do different work or fail alone (two CPU processes over gloo).

- ZeRO-3 with uneven work: after the kept groups are split, one rank has no group of its own at a
  step and the other has two micro-batches; every forward gathers the parameters, so the ranks
  must run the same passes. The run ends, and its losses and KL terms (reference model sharded
  like the policy) equal those of the same two ranks under DDP, which needs no padding.
- A reward that fails on rank 1 only, with bad_steps=skip: both ranks skip that step, and the run
  is the run whose reward fails on every rank at that step.
- A ZeRO-2 resume with one rank's optimizer shard deleted: one line naming it, exit status 2.

Why DDP and not one process is the reference: vLLM samples a batch from one generator, so one
process sampling all four prompts draws other completions than two ranks sampling two each, while
the two launches of two ranks sample the same. That DDP's update is the one-process update, a rank
with no group included, is tests/recipes/test_pg_distributed.py. REINFORCE with one sample per
prompt whitens the advantages over the whole batch.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from torch.distributed.elastic.utils.distributed import get_free_port

from rlx.metrics import read_metrics

ROOT = Path(__file__).resolve().parents[2]
RECIPE = ROOT / "recipes" / "pg.py"

# The reward: completion length, except at the call given by RLX_TEST_DROP_CALL (the step), where
# the prompts at even positions of the step (position = local index * world + rank, the order
# `idx[rank::world]` deals them) get None, and at RLX_TEST_FAIL_CALL, where the ranks in
# RLX_TEST_FAIL_RANKS raise. None drops the group; two processes then keep no group on rank 0.
REWARD = """
import os

calls = 0


def longer(prompts, completions, **kw):
    global calls
    calls += 1
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if str(calls) == os.environ.get("RLX_TEST_FAIL_CALL") and str(rank) in os.environ.get(
        "RLX_TEST_FAIL_RANKS", ""
    ):
        raise ValueError(f"test failure on rank {rank}")
    drop = str(calls) == os.environ.get("RLX_TEST_DROP_CALL")
    return [
        None if drop and (i * world + rank) % 2 == 0 else min(len(c), 40) / 40
        for i, c in enumerate(completions)
    ]
"""


@pytest.fixture(scope="module")
def reward(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("rank_rewards") / "length.py"
    path.write_text(REWARD)
    return path


def recipe_args(model: str, reward: Path, out: Path, *extra: str) -> list[str]:
    args = [str(RECIPE), "--config", str(ROOT / "recipes" / "reinforce.yaml")]
    args += [f"model.name={model}", "rollout.dtype=float32", "rollout.num_samples=1"]
    args += ["rollout.max_new_tokens=12", "algo.learner=reinforce"]
    args += ["algo.tis_cap=0", "prompts_per_step=4", "micro_batch_size=1", "steps=3"]
    args += ["eval.enabled=false", "log_with=[]", "optim.lr=1e-2", "bf16_autocast=false"]
    args += ["max_minutes=0", f"output_dir={out}"]
    args += [f"rewards=[{{func: '{reward}:longer', weight: 1.0}}]", *extra]
    return args


def kill_process_tree(pid: int) -> None:
    """SIGKILL a launch and every process it started, by pid (torch's launcher starts each rank in
    its own session, so killing the launcher's process group would leave the ranks running)."""
    import contextlib

    import psutil

    with contextlib.suppress(psutil.NoSuchProcess):
        parent = psutil.Process(pid)
        for proc in [*parent.children(recursive=True), parent]:
            with contextlib.suppress(psutil.NoSuchProcess):
                proc.kill()


def run(launch: str, args: list[str], log: Path, env: dict, timeout: float = 300):
    """One accelerate launch with launch/<launch>.yaml. A hang (the failure mode of ranks that
    disagree) fails the test at `timeout` seconds."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file"]
    cmd += [str(ROOT / "launch" / f"{launch}.yaml"), "--main_process_port"]
    cmd += [str(get_free_port()), *args]
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **env}
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=full_env, stdout=out, stderr=subprocess.STDOUT)
        try:
            code = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            kill_process_tree(proc.pid)  # the launcher and its ranks
            proc.wait()
            pytest.fail(f"{launch} run hung for {timeout} s:\n{log.read_text()[-3000:]}")
    return code, log.read_text()


@pytest.fixture(scope="module")
def uneven(tiny_llama, reward, tmp_path_factory) -> tuple[list[dict], list[dict]]:
    """(DDP, ZeRO-3) metrics of the same two-rank run with the KL term on and two PPO epochs (so
    the old-logprob pass runs too); at step 2 rank 0 keeps no group."""
    tmp = tmp_path_factory.mktemp("uneven")
    extra = ("algo.kl_beta=0.05", "algo.ppo_epochs=2")
    env = {"RLX_TEST_DROP_CALL": "2"}
    rows = []
    for name, launch in (("ddp", "cpu_2proc"), ("zero3", "cpu_2proc_zero3")):
        out = tmp / name
        code, log = run(
            launch, recipe_args(tiny_llama, reward, out, *extra), tmp / f"{name}.log", env
        )
        assert code == 0, log[-3000:]
        rows.append(read_metrics(out / "metrics.jsonl"))
    assert "DeepSpeed ZeRO-3" in (tmp / "zero3.log").read_text()
    return rows[0], rows[1]


@pytest.mark.slow  # two 2-process runs (DeepSpeed included), 2-4 minutes on 2 cores
@pytest.mark.multiprocess
def test_zero3_with_uneven_work_trains_like_ddp(uneven):
    one, two = uneven
    assert [r["step"] for r in two] == [1, 2, 3]
    assert one[1]["groups_kept"] == 2 and one[1]["groups_total"] == 4  # rank 0 had none
    for a, b in zip(one, two, strict=True):
        assert a["reward_mean"] == pytest.approx(b["reward_mean"], abs=1e-9), a["step"]
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5), a["step"]
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4), a["step"]


@pytest.mark.slow
@pytest.mark.multiprocess
def test_zero3_reference_model_gives_the_ddp_kl(uneven):
    one, two = uneven
    assert all(r["kl"] > 1e-6 for r in one)  # the second PPO epoch moved away from the reference
    for a, b in zip(one, two, strict=True):
        assert a["kl"] == pytest.approx(b["kl"], rel=1e-4, abs=1e-7), a["step"]


@pytest.mark.slow  # two 2-process runs, about 2 minutes on a 2-core AVX2 machine
@pytest.mark.multiprocess
def test_a_reward_failing_on_one_rank_skips_the_step_on_every_rank(tiny_llama, reward, tmp_path):
    """DDP: rank 1's reward raises at step 2. Today's code would let rank 0 pair its step-2 gather
    with rank 1's step-3 one (the same shapes: silently misaligned rewards), then hang."""
    rows = {}
    for name, ranks in (("one_rank", "1"), ("every_rank", "01")):
        out = tmp_path / name
        env = {"RLX_TEST_FAIL_CALL": "2", "RLX_TEST_FAIL_RANKS": ranks}
        args = recipe_args(tiny_llama, reward, out, "bad_steps=skip")
        code, log = run("cpu_2proc", args, tmp_path / f"{name}.log", env)
        assert code == 0, log[-3000:]
        assert log.count("step 2 skipped") == 1, log[-3000:]  # logged once, not per rank
        rows[name] = read_metrics(out / "metrics.jsonl")
    a, b = rows["one_rank"], rows["every_rank"]
    assert [r["step"] for r in a] == [1, 2, 3]
    assert "reward function failed" in a[1]["skipped"] and "skipped" in b[1]
    for ra, rb in zip(a, b, strict=True):
        if "skipped" not in ra:
            assert ra["reward_mean"] == rb["reward_mean"], ra["step"]
            assert ra["loss"] == pytest.approx(rb["loss"], abs=1e-6), ra["step"]


@pytest.mark.slow  # a 2-process ZeRO-2 run and a resume, about 2 minutes on 2 cores
@pytest.mark.multiprocess
def test_zero2_resume_with_a_missing_optimizer_shard_is_one_line(tiny_llama, reward, tmp_path):
    out = tmp_path / "z2"
    args = recipe_args(tiny_llama, reward, out, "steps=2", "save_every=1")
    code, log = run("cpu_2proc_zero2", args, tmp_path / "first.log", {})
    assert code == 0, log[-3000:]
    shards = sorted((out / "checkpoints" / "step-000002" / "deepspeed").rglob("*rank_1*optim*"))
    assert len(shards) == 1, sorted((out / "checkpoints").rglob("*"))
    shards[0].unlink()
    code, log = run("cpu_2proc_zero2", [*args, "resume_from=latest"], tmp_path / "resume.log", {})
    assert code != 0 and "exitcode: 2" in log, log[-3000:]  # the ranks' status 2; the launcher 1
    errors = [line for line in log.splitlines() if "pg: error:" in line]
    assert errors and all(shards[0].name in line and "missing" in line for line in errors), log
    assert len(set(errors)) == 1  # the same line from each rank
