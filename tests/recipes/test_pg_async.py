"""recipes/pg.py with rollout.async=true on a tiny model (rlx/rollout_source.py): a short run
completes, logs its async/* metrics, corrects with the sampler's logprobs and never trains on a
batch more than rollout.max_staleness versions old; a run killed after a checkpoint resumes from
it with the producer restarted at the checkpoint's step."""

from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from rlx.config import PGConfig, load_config
from rlx.metrics import read_metrics
from rlx.recipe import CRASH_AFTER_CHECKPOINT

ROOT = Path(__file__).resolve().parents[2]
RECIPE = ROOT / "recipes" / "pg.py"
COMPLETIONS = 4 * 4  # prompts_per_step x num_samples


def load_recipe():
    spec = importlib.util.spec_from_file_location("pg_recipe_async", RECIPE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def overrides(model, out, reward_file, **extra) -> list[str]:
    base = {
        "model.name": model,
        "rollout.backend": "hf",  # no vLLM start-up: seconds, not minutes
        "rollout.dtype": "float32",
        "rollout.async": "true",
        "rollout.max_staleness": 1,
        "rollout.num_samples": 4,
        "rollout.max_new_tokens": 8,
        "prompts_per_step": 4,
        "steps": 4,
        "micro_batch_size": 16,
        "eval.enabled": "false",
        "output_dir": str(out),
        "log_with": "[]",
        "rewards": f"[{{func: '{reward_file}:longer', weight: 1.0}}]",
        "optim.lr": 1e-3,
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


@pytest.fixture(scope="module")
def reward_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("rewards") / "length.py"
    path.write_text(
        "def longer(prompts, completions, **kw):\n"
        "    return [min(len(c), 40) / 40 for c in completions]\n"
    )
    return path


def check_async_rows(rows, k: int = 1) -> None:
    """Every step trained on COMPLETIONS completions of staleness <= k, with the importance
    weights on; the idle shares are shares."""
    for r in rows:
        assert sum(r[f"async/staleness_{s}"] for s in range(k + 1)) == COMPLETIONS, r
        assert not any(key.startswith(f"async/staleness_{k + 1}") for key in r)
        assert r["async/dropped"] == 0
        assert 0 <= r["async/trainer_idle"] <= 1 and 0 <= r["async/generator_idle"] <= 1
        assert r["async/queue"] >= 0
        assert r["tis_max"] > 0  # the behaviour policy's logprobs weigh the loss


def test_async_run_trains_within_max_staleness(tiny_llama, tmp_path, reward_file):
    """The one default-tier run: about 10 s on a 2-core AVX2 CPU (HF engine, 3 steps)."""
    args = overrides(tiny_llama, tmp_path, reward_file, steps=3)
    load_recipe().train(load_config(PGConfig, overrides=args))
    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3]
    check_async_rows(rows)
    # step 1 samples the initial weights fresh; from step 2 on the batch was sampled while the
    # learner trained the step before: one version behind
    assert rows[0]["async/staleness_0"] == COMPLETIONS
    assert all(r["async/staleness_1"] == COMPLETIONS for r in rows[1:])


def _launch(args: list[str], out: Path, env: dict | None = None) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    log = open(out.parent / f"{out.name}.log", "w")  # noqa: SIM115 - closed with the process
    return subprocess.Popen(args, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)


@pytest.mark.slow  # three processes on the tiny model: about a minute on a 2-core AVX2 CPU
def test_async_run_killed_after_a_checkpoint_resumes_from_it(tiny_llama, tmp_path, reward_file):
    """In-flight completions are not checkpointed: the resumed run restarts its producer at the
    checkpoint's step on the checkpoint's weights (staleness 0 for that step), and the steps
    before the checkpoint are those of an uninterrupted run."""
    common = {"save_every": 1}
    cmd = [sys.executable, str(RECIPE)]
    full = tmp_path / "full"
    assert _launch(cmd + overrides(tiny_llama, full, reward_file, **common), full).wait(600) == 0

    killed = tmp_path / "killed"
    crash = {CRASH_AFTER_CHECKPOINT: "2"}
    proc = _launch(cmd + overrides(tiny_llama, killed, reward_file, **common), killed, crash)
    assert proc.wait(timeout=600) == -signal.SIGKILL
    args = overrides(tiny_llama, killed, reward_file, resume_from="latest", **common)
    assert _launch(cmd + args, killed).wait(timeout=600) == 0

    a, b = read_metrics(full / "metrics.jsonl"), read_metrics(killed / "metrics.jsonl")
    assert [r["step"] for r in b] == [1, 2, 3, 4]
    check_async_rows(b)
    for ra, rb in zip(a[:2], b[:2], strict=True):  # before the checkpoint: the same run
        assert ra["reward_mean"] == rb["reward_mean"], ra["step"]
        assert ra["loss"] == pytest.approx(rb["loss"], rel=1e-6, abs=1e-9), ra["step"]
    assert a[2]["async/staleness_1"] == COMPLETIONS  # uninterrupted: sampled during step 2
    assert b[2]["async/staleness_0"] == COMPLETIONS  # resumed: sampled on the checkpoint
    assert b[3]["async/staleness_1"] == COMPLETIONS  # and from there on as before
    assert "resumed from" in (tmp_path / "killed.log").read_text()


@pytest.mark.slow  # starts a vLLM engine (about 40 s on a 2-core AVX2 CPU)
def test_async_run_on_in_process_vllm(tiny_llama, tmp_path, reward_file):
    """The producer thread drives the in-process vLLM engine; syncs and the final evaluation
    take the engine lock in between."""
    extra = {"rollout.backend": "vllm", "steps": 3, "eval.enabled": "true"}
    extra |= {"eval.num_prompts": 4, "eval.max_new_tokens": 8}
    cfg = load_config(PGConfig, overrides=overrides(tiny_llama, tmp_path, reward_file, **extra))
    results = load_recipe().train(cfg)
    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3]
    check_async_rows(rows)
    assert results["after"]["num_completions"] == 4


@pytest.mark.slow  # a rollout server and two trainer processes: minutes on a 2-core AVX2 CPU
@pytest.mark.multiprocess
def test_two_ranks_async_on_a_rollout_server(
    tiny_tied, rollout_server, tmp_path, reward_file, free_port
):
    """Two trainer ranks, each with its own producer, sampling from `rlx serve`: every step
    trains on the whole batch (histogram summed over ranks), within max_staleness."""
    out = tmp_path / "two"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file"]
    cmd += [str(ROOT / "launch" / "cpu_2proc.yaml"), "--main_process_port", str(free_port)]
    extra = {"rollout.backend": "server", "rollout.servers": f"[{rollout_server[0]}]"}
    extra |= {"rollout.timeout_s": 120, "steps": 3}
    proc = _launch([*cmd, str(RECIPE), *overrides(tiny_tied, out, reward_file, **extra)], out)
    code = proc.wait(timeout=900)
    log = (tmp_path / "two.log").read_text()
    assert code == 0, log[-3000:]
    assert "pg: 2 process(es)" in log
    rows = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3]
    check_async_rows(rows)
