"""recipes/pg.py end to end on a tiny model with the real vLLM engine: outputs, resume after
SIGKILL, two processes, and the bad-input paths."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from rlx.config import PGConfig, load_config
from rlx.metrics import read_metrics
from rlx.recipe import CRASH_AFTER_CHECKPOINT

ROOT = Path(__file__).resolve().parents[2]
RECIPE = ROOT / "recipes" / "pg.py"
REQUIRED = {"step", "reward_mean", "loss", "logprob_gap_max", "step_time_s"}


def load_recipe():
    spec = importlib.util.spec_from_file_location("pg_recipe", RECIPE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def length_reward(tmp_path_factory):
    """A reward a tiny random model can move: longer completions score higher."""
    path = tmp_path_factory.mktemp("rewards") / "length.py"
    path.write_text(
        "def longer(prompts, completions, **kw):\n"
        "    return [min(len(c), 40) / 40 for c in completions]\n"
        "def broken(prompts, completions, **kw):\n"
        "    raise RuntimeError('boom')\n"
        "def constant(prompts, completions, **kw):\n"
        "    return [1.0] * len(completions)\n"
        "def nones(prompts, completions, **kw):\n"
        "    return [None] * len(completions)\n"
        "def shorter(prompts, completions, **kw):\n"
        "    return [1 - min(len(c), 40) / 40 for c in completions]\n"
        "def shorter_squared(prompts, completions, **kw):\n"
        "    return [1 - (min(len(c), 40) / 40) ** 2 for c in completions]\n"
        "def chars(prompts, completions, **kw):\n"
        "    return [float(len(c)) for c in completions]\n"
    )
    return path


def overrides(model, out, reward, **extra) -> list[str]:
    base = {
        "model.name": model,
        "rollout.dtype": "float32",
        "rollout.num_samples": 4,
        "rollout.max_new_tokens": 12,
        "prompts_per_step": 4,
        "steps": 3,
        "micro_batch_size": 8,
        "eval.num_prompts": 6,
        "eval.max_new_tokens": 12,
        "output_dir": str(out),
        "log_with": "[]",
        "rewards": f"[{{func: '{reward}', weight: 1.0}}]",
        "optim.lr": 1e-3,
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


def test_short_run_writes_every_output(tiny_llama, tmp_path, length_reward):
    extra = {"log_with": "[tensorboard]"}
    reward = f"{length_reward}:longer"
    cfg = load_config(PGConfig, overrides=overrides(tiny_llama, tmp_path, reward, **extra))
    results = load_recipe().train(cfg)
    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3]
    for r in rows:
        assert set(r) >= REQUIRED and r["groups_total"] == 4
        assert r["logprob_gap_max"] < 0.05  # fp32 engine, weights synced every step
    assert set(json.loads((tmp_path / "eval.json").read_text())) >= {"before", "after"}
    assert results["after"]["num_completions"] == 6
    assert (tmp_path / "reward_curves.png").stat().st_size > 1000
    assert (tmp_path / "checkpoints" / "step-000003" / "model" / "model.safetensors").exists()
    assert list(tmp_path.rglob("events.out.tfevents*")), "tensorboard tracker wrote nothing"
    final = AutoModelForCausalLM.from_pretrained(tmp_path / "final")  # plain HF folder + tokenizer
    assert (tmp_path / "final" / "tokenizer.json").exists() and final.config.vocab_size > 0


def test_sync_every_k_steps_shows_as_logprob_gap(tiny_llama, tmp_path, length_reward):
    """Without a sync the engine samples from stale weights: the gap alarm must go up."""
    extra = {"sync_every": 100, "eval.enabled": "false", "optim.lr": 1e-2}
    cfg = load_config(
        PGConfig, overrides=overrides(tiny_llama, tmp_path, f"{length_reward}:longer", **extra)
    )
    load_recipe().train(cfg)
    gaps = [r["logprob_gap_max"] for r in read_metrics(tmp_path / "metrics.jsonl")]
    assert gaps[0] < 0.05 and gaps[-1] > 0.1


def test_lora_run_merges_for_sync(tiny_llama, tmp_path, length_reward):
    extra = {
        "adapter.method": "lora",
        "adapter.rank": 4,
        "eval.enabled": "false",
        "steps": 2,
        "optim.schedule": "linear",
    }
    cfg = load_config(
        PGConfig, overrides=overrides(tiny_llama, tmp_path, f"{length_reward}:longer", **extra)
    )
    load_recipe().train(cfg)
    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert all(r["logprob_gap_max"] < 0.05 for r in rows)  # merged LoRA weights reached vLLM
    # the rate each step trained with: linear decay from 1e-3 towards 0 at `steps`
    assert [r["lr"] for r in rows] == pytest.approx([1e-3, 5e-4])
    assert (
        tmp_path / "checkpoints" / "step-000002" / "model" / "adapter_model.safetensors"
    ).exists()


def test_all_equal_rewards_skip_the_update(tiny_llama, tmp_path, length_reward):
    extra = {"eval.enabled": "false", "steps": 1}
    cfg = load_config(
        PGConfig, overrides=overrides(tiny_llama, tmp_path, f"{length_reward}:constant", **extra)
    )
    load_recipe().train(cfg)
    (row,) = read_metrics(tmp_path / "metrics.jsonl")
    assert row["groups_kept"] == 0 and row["skipped"] == "no group with signal"
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    saved = load_file(tmp_path / "checkpoints" / "step-000001" / "model" / "model.safetensors")
    original = AutoModelForCausalLM.from_pretrained(tiny_llama).state_dict()
    assert all(torch.equal(saved[k], original[k]) for k in saved)  # no update happened


def test_kl_to_reference_model(tiny_llama, tmp_path, length_reward):
    extra = {"algo.kl_beta": 0.1, "eval.enabled": "false", "steps": 2, "optim.lr": 1e-2}
    cfg = load_config(
        PGConfig, overrides=overrides(tiny_llama, tmp_path, f"{length_reward}:longer", **extra)
    )
    load_recipe().train(cfg)
    kl = [r["kl"] for r in read_metrics(tmp_path / "metrics.jsonl")]
    assert kl[0] == pytest.approx(0, abs=1e-6) and kl[1] > 1e-6  # policy == reference, then moves


def test_reward_none_for_whole_groups_drops_them(tiny_llama, tmp_path, length_reward):
    extra = {"eval.enabled": "false", "steps": 1}
    cfg = load_config(
        PGConfig, overrides=overrides(tiny_llama, tmp_path, f"{length_reward}:nones", **extra)
    )
    load_recipe().train(cfg)
    (row,) = read_metrics(tmp_path / "metrics.jsonl")
    assert row["groups_kept"] == 0 and row["reward_mean"] is None


def test_non_finite_loss_errors_or_skips(tiny_llama, tmp_path, length_reward, monkeypatch):
    recipe = load_recipe()
    real = recipe.pg.clipped_policy_loss

    def nan_loss(*args, **kwargs):
        per_token, low, high = real(*args, **kwargs)
        return per_token * float("nan"), low, high

    monkeypatch.setattr(recipe.pg, "clipped_policy_loss", nan_loss)
    extra = {"eval.enabled": "false", "steps": 1}
    cfg = load_config(
        PGConfig,
        overrides=overrides(tiny_llama, tmp_path / "a", f"{length_reward}:longer", **extra),
    )
    with pytest.raises(FloatingPointError, match="not finite"):
        recipe.train(cfg)
    extra["bad_steps"] = "skip"
    cfg = load_config(
        PGConfig,
        overrides=overrides(tiny_llama, tmp_path / "b", f"{length_reward}:longer", **extra),
    )
    recipe.train(cfg)
    (row,) = read_metrics(tmp_path / "b" / "metrics.jsonl")
    assert row["skipped"] == "non-finite loss"


def test_reward_failure_errors_or_skips(tiny_llama, tmp_path, length_reward):
    recipe = load_recipe()
    extra = {"eval.enabled": "false", "steps": 2}
    cfg = load_config(
        PGConfig,
        overrides=overrides(tiny_llama, tmp_path / "a", f"{length_reward}:broken", **extra),
    )
    with pytest.raises(Exception, match="boom"):
        recipe.train(cfg)
    extra["bad_steps"] = "skip"
    cfg = load_config(
        PGConfig,
        overrides=overrides(tiny_llama, tmp_path / "b", f"{length_reward}:broken", **extra),
    )
    recipe.train(cfg)
    rows = read_metrics(tmp_path / "b" / "metrics.jsonl")
    assert len(rows) == 2 and all("reward function failed" in r["skipped"] for r in rows)


def test_long_prompts_error_names_the_knob(tiny_llama, tmp_path, length_reward):
    extra = {"max_prompt_tokens": 5}
    cfg = load_config(
        PGConfig, overrides=overrides(tiny_llama, tmp_path, f"{length_reward}:longer", **extra)
    )
    with pytest.raises(ValueError, match="max_prompt_tokens=5"):
        load_recipe().train(cfg)


def _launch(args: list[str], out: Path, env: dict | None = None) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    log = open(out.parent / f"{out.name}.log", "w")  # noqa: SIM115 - closed with the process
    return subprocess.Popen(args, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)


def test_sigkill_then_resume_matches_uninterrupted_run(tiny_llama, tmp_path, length_reward):
    """Kill -9 after the step-2 checkpoint, resume from latest: same per-step rewards and losses."""
    reward = f"{length_reward}:longer"
    common = {"steps": 5, "save_every": 1, "eval.enabled": "false"}
    full = tmp_path / "full"
    cmd = [sys.executable, str(RECIPE)]
    assert _launch(cmd + overrides(tiny_llama, full, reward, **common), full).wait(timeout=600) == 0

    killed = tmp_path / "killed"
    crash = {CRASH_AFTER_CHECKPOINT: "2"}  # SIGKILL right after the step-2 checkpoint
    proc = _launch(cmd + overrides(tiny_llama, killed, reward, **common), killed, env=crash)
    assert proc.wait(timeout=600) == -signal.SIGKILL
    assert not (killed / "checkpoints" / "step-000005").exists()
    resumed = _launch(
        cmd + overrides(tiny_llama, killed, reward, resume_from="latest", **common), killed
    )
    assert resumed.wait(timeout=600) == 0

    a, b = read_metrics(full / "metrics.jsonl"), read_metrics(killed / "metrics.jsonl")
    assert [r["step"] for r in b] == [1, 2, 3, 4, 5]
    for ra, rb in zip(a, b, strict=True):
        assert ra["reward_mean"] == rb["reward_mean"], ra["step"]
        assert ra["loss"] == pytest.approx(rb["loss"], rel=1e-6, abs=1e-9), ra["step"]


@pytest.mark.slow  # 36 s on a 2-core AVX2 CPU; the two-process launch below covers accelerate
def test_accelerate_launch_one_process(tiny_llama, tmp_path, length_reward):
    out = tmp_path / "one"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", str(RECIPE)]
    proc = _launch(
        cmd
        + overrides(
            tiny_llama, out, f"{length_reward}:longer", steps=1, **{"eval.enabled": "false"}
        ),
        out,
    )
    assert proc.wait(timeout=600) == 0, (tmp_path / "one.log").read_text()[-3000:]
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl")] == [1]


@pytest.mark.slow  # about 36 s; the default tier launches two processes in test_pg_zero's ZeRO-3 run
@pytest.mark.multiprocess
def test_two_processes_train_data_parallel(tiny_llama, tmp_path, length_reward, free_port):
    """accelerate launch with two CPU processes (gloo): each rank rolls out half the prompts."""
    out = tmp_path / "two"
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(ROOT / "launch" / "cpu_2proc.yaml"),
        "--main_process_port",
        str(free_port),
        str(RECIPE),
    ]
    proc = _launch(
        cmd
        + overrides(
            tiny_llama, out, f"{length_reward}:longer", steps=2, **{"eval.enabled": "false"}
        ),
        out,
    )
    code = proc.wait(timeout=600)
    log = (tmp_path / "two.log").read_text()
    assert code == 0, log[-3000:]
    assert "pg: 2 process(es)" in log
    rows = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2] and all(r["groups_total"] == 4 for r in rows)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_hf_backend_run_on_cuda(tiny_llama, tmp_path, length_reward):
    """The whole loop on a GPU with the HF generate fallback (no vLLM needed): it trains and
    the synced rollout weights match the trainer's, so the logprob gap stays small."""
    extra = {"rollout.backend": "hf", "steps": 2}
    cfg = load_config(
        PGConfig, overrides=overrides(tiny_llama, tmp_path, f"{length_reward}:longer", **extra)
    )
    results = load_recipe().train(cfg)
    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2]
    assert all(r["logprob_gap_max"] < 0.05 and math.isfinite(r["loss"]) for r in rows)
    assert results["after"]["num_completions"] == 6


def _crafted_step(recipe, model_path, tmp_path, **algo):
    """A real policy, its optimizer and a crafted 4-prompt x 2-completion step, all kept."""
    spec = importlib.util.spec_from_file_location(
        "ddp", ROOT / "tests" / "recipes" / "pg_ddp_gradients.py"
    )
    crafted = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(crafted)
    extra = {f"algo.{k}": v for k, v in algo.items()} | {"rollout.num_samples": 2}
    cfg = load_config(PGConfig, overrides=overrides(model_path, tmp_path, "x:y", **extra))
    model, tokenizer = recipe.load_policy(cfg.model, cfg.adapter)
    completions = crafted.crafted_completions(model.config.vocab_size)
    total = torch.tensor(crafted.REWARDS["all_kept"])
    lengths = torch.ones_like(total)
    per_fn = total[..., None]
    adv, keep = recipe.pg.kept_advantages(
        "grpo", total, per_fn, lengths, [1.0], "sum_then_normalize", True
    )
    parts = recipe.mini_batch_parts(keep, cfg.algo.mini_batches)
    num_parts, pad = int(parts.max()) + 1, tokenizer.pad_token_id
    batches = recipe.local_mini_batches(cfg, completions, parts, adv, pad, num_parts)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-2)
    return cfg, model, optimizer, batches


@pytest.mark.parametrize("epochs,minis", [(2, 2), (1, 1)])
def test_ppo_epochs_and_mini_batches(tiny_llama, tmp_path, monkeypatch, epochs, minis):
    """ppo_epochs x mini_batches optimizer steps; the old logprobs are taken once, before the
    first; in the second epoch the ratio has moved and both clip bounds act. One epoch of one
    mini-batch takes no separate old-logprob pass and its ratio is exactly 1."""
    from accelerate import Accelerator

    recipe = load_recipe()
    cfg, model, optimizer, batches = _crafted_step(
        recipe, tiny_llama, tmp_path, ppo_epochs=epochs, mini_batches=minis
    )
    assert len(batches) == minis and all(mb.batch.num_groups == 4 // minis for mb in batches)
    events = []
    real_logprobs, real_step = recipe.policy_logprobs, optimizer.step
    monkeypatch.setattr(
        recipe, "policy_logprobs", lambda *a: events.append("old") or real_logprobs(*a)
    )
    monkeypatch.setattr(optimizer, "step", lambda: events.append("step") or real_step())
    trainable = list(model.parameters())
    accelerator = Accelerator(cpu=True)
    updates = recipe.update_policy(cfg, accelerator, model, None, optimizer, trainable, batches, 1)
    assert len(updates) == epochs * minis
    if (epochs, minis) == (1, 1):
        assert events == ["step"] and updates[0]["ratio_dev_max"] == 0.0
        return
    assert events == ["old", "old"] + ["step"] * 4  # old logprobs of both mini-batches, once
    assert updates[0]["ratio_dev_max"] == 0.0  # the first update sees the old policy itself
    for second_epoch in updates[2:]:
        assert second_epoch["ratio_dev_max"] > 0.3
        assert second_epoch["clip_low"] > 0 and second_epoch["clip_high"] > 0


def test_ppo_epochs_run_logs_updates_and_clip_bounds(tiny_llama, tmp_path, length_reward):
    """The loop wires the knobs: a step makes ppo_epochs x mini_batches updates and logs them."""
    extra = {"eval.enabled": "false", "steps": 1, "algo.ppo_epochs": 2, "algo.mini_batches": 2}
    cfg = load_config(
        PGConfig, overrides=overrides(tiny_llama, tmp_path, f"{length_reward}:longer", **extra)
    )
    load_recipe().train(cfg)
    (row,) = read_metrics(tmp_path / "metrics.jsonl")
    assert row["updates"] == 4 and row["train_flops_per_s"] > 0
    assert 0 <= row["clip_low_fraction"] <= 1 and 0 <= row["clip_high_fraction"] <= 1


def test_mask_truncated_completions_weighs_them_zero(tiny_llama, tmp_path):
    """mask_truncated_completions: a completion cut at max_new_tokens gets loss weight 0 (and
    still has its tokens in the batch: the mask is the loss's, not the attention's)."""
    from rlx.rollout.base import Completion

    recipe = load_recipe()
    completions = [
        Completion(i // 2, [5, 6], [7, 8], [-1.0, -1.0], "", "length" if i == 3 else "stop")
        for i in range(8)
    ]
    parts = torch.zeros(4, dtype=torch.long)  # every group in the one mini-batch
    for masked, expected in ((False, [1.0] * 8), (True, [1, 1, 1, 0, 1, 1, 1, 1])):
        extra = {"rollout.num_samples": 2, "algo.mask_truncated_completions": masked}
        cfg = load_config(PGConfig, overrides=overrides(tiny_llama, tmp_path, "x:y", **extra))
        (mini,) = recipe.local_mini_batches(cfg, completions, parts, torch.ones(4, 2), 0, 1)
        assert mini.weights.tolist() == expected
        assert mini.batch.completion_mask.sum() == 16


def test_hypervolume_weighting_logs_its_state_and_resumes_exactly(
    tiny_llama, tmp_path, length_reward
):
    """weighting.method=hypervolume on two conflicting rewards: every step logs the
    validation point, its hypervolume contribution and the meta-reward; the buffer and the
    meta-reward are checkpointed, so a run resumed after step 2 repeats step 3 exactly."""
    rewards = f"[{{func: '{length_reward}:longer', weight: 0.7}}, "
    rewards += f"{{func: '{length_reward}:shorter', weight: 0.3}}]"
    extra = {"rewards": rewards, "weighting.method": "hypervolume", "weighting.hv_prompts": 4}
    extra |= {"eval.num_prompts": 4, "save_every": 1, "weighting.hv_minimise": "[chars]"}
    # shorter is validated by the length in characters, minimised; the preference weights adapt
    extra |= {"weighting.hv_validation": f"{{shorter: '{length_reward}:chars'}}"}
    extra |= {"weighting.hv_adapt_weights": "true"}
    recipe = load_recipe()

    def run(out, steps, **more):
        overrides_ = overrides(tiny_llama, out, "unused", **(extra | {"steps": steps} | more))
        recipe.train(load_config(PGConfig, overrides=overrides_))
        return read_metrics(out / "metrics.jsonl")

    full = run(tmp_path / "full", 3)
    assert all(
        {"meta_reward", "hypervolume", "hvc", "val/longer", "val/chars"} <= set(r) for r in full
    )
    assert all(0.5 <= r["meta_reward"] <= 2.0 for r in full)
    assert [full[0]["weight/longer"], full[0]["weight/shorter"]] == pytest.approx([0.7, 0.3])
    assert any(r["weight/longer"] != pytest.approx(0.7) for r in full)  # adapted
    state = json.loads(
        (tmp_path / "full" / "checkpoints" / "step-000003" / "state.json").read_text()
    )
    assert state["weighting"]["factor"] == full[-1]["meta_reward"]
    assert state["weighting"]["buffer"]["reference"]  # kept even while no point joined
    assert (tmp_path / "full" / "weighting.png").stat().st_size > 0

    run(tmp_path / "part", 2)
    resumed = run(tmp_path / "part", 3, resume_from="latest")
    assert [r["step"] for r in resumed] == [1, 2, 3]
    for key in ("reward_mean", "loss", "meta_reward", "hypervolume", "val/longer", "weight/longer"):
        assert resumed[2][key] == pytest.approx(full[2][key], rel=1e-6, abs=1e-9), key
    assert _final_weighting(tmp_path / "part") == pytest.approx(state["weighting"]["weights"])


def test_gradient_weighting_moves_the_weights_and_resumes_exactly(
    tiny_llama, tmp_path, length_reward
):
    """weighting.method=gradient on two conflicting rewards: each step logs the influences
    and the weights of its update; the weights are checkpointed, so a run resumed after step 2
    repeats step 3 exactly. The influences of opposite rewards are mostly negative: the weights
    move. Not `longer` against `shorter`: their gradients are exact opposites, so their sum, and
    with it every influence, is zero but for rounding."""
    rewards = f"[{{func: '{length_reward}:longer', weight: 0.5}}, "
    rewards += f"{{func: '{length_reward}:shorter_squared', weight: 0.5}}]"
    extra = {"rewards": rewards, "weighting.method": "gradient", "save_every": 1}
    extra |= {"eval.enabled": "false", "weighting.grad_lambda": 1e-3, "algo.kl_beta": 0.05}
    recipe = load_recipe()

    def run(out, steps, **more):
        overrides_ = overrides(tiny_llama, out, "unused", **(extra | {"steps": steps} | more))
        recipe.train(load_config(PGConfig, overrides=overrides_))
        return read_metrics(out / "metrics.jsonl")

    full = run(tmp_path / "full", 3)
    keys = {"weight/longer", "weight/shorter_squared", "influence/longer"}
    assert all(keys | {"influence/shorter_squared"} <= set(r) for r in full)
    for r in full:
        assert r["weight/longer"] + r["weight/shorter_squared"] == pytest.approx(1.0)
    assert full[0]["weight/longer"] != pytest.approx(0.5)  # moved before the first update
    state = json.loads(
        (tmp_path / "full" / "checkpoints" / "step-000003" / "state.json").read_text()
    )
    assert state["weighting"]["weights"][0] == pytest.approx(full[-1]["weight/longer"])

    run(tmp_path / "part", 2)
    resumed = run(tmp_path / "part", 3, resume_from="latest")
    for key in ("reward_mean", "loss", "weight/longer", "influence/longer"):
        assert resumed[2][key] == pytest.approx(full[2][key], rel=1e-5, abs=1e-9), key
    assert _final_weighting(tmp_path / "part") == pytest.approx(state["weighting"]["weights"])


def _final_weighting(out):
    """The weights in the state.json of a run's step-3 checkpoint."""
    state = json.loads((out / "checkpoints" / "step-000003" / "state.json").read_text())
    return state["weighting"]["weights"]


def test_hypervolume_weighting_needs_two_or_three_rewards(tiny_llama, tmp_path, length_reward):
    from rlx.config import ConfigError

    extra = {"weighting.method": "hypervolume", "eval.num_prompts": 4, "steps": 1}
    cfg = load_config(
        PGConfig, overrides=overrides(tiny_llama, tmp_path, f"{length_reward}:longer", **extra)
    )
    with pytest.raises(ConfigError, match="2 or 3 reward functions"):
        load_recipe().train(cfg)
