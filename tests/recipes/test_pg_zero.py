"""recipes/pg.py under DeepSpeed ZeRO through accelerate (two CPU processes over gloo): ZeRO-3
really shards, the gathered weight sync is exact, a ZeRO-2 run killed with SIGKILL resumes to
the uninterrupted run's rewards and losses, and a step with a non-finite loss or gradient is
skipped with nothing applied (or, after updates of the step were applied, keeps them)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch.distributed.elastic.utils.distributed import get_free_port
from transformers import AutoModelForCausalLM

from rlx.metrics import read_metrics
from rlx.recipe import CRASH_AFTER_CHECKPOINT

ROOT = Path(__file__).resolve().parents[2]
RECIPE = ROOT / "recipes" / "pg.py"


def launch(
    stage: int,
    model: str,
    out: Path,
    reward: Path,
    *extra: str,
    env: dict | None = None,
    script: Path = RECIPE,
    config: Path | None = None,
) -> subprocess.Popen:
    config = config or ROOT / "launch" / f"cpu_2proc_zero{stage}.yaml"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config)]
    cmd += ["--main_process_port", str(get_free_port()), str(script)]
    cmd += [f"model.name={model}", "rollout.dtype=float32", "rollout.num_samples=4"]
    cmd += ["rollout.max_new_tokens=12", "prompts_per_step=4", "micro_batch_size=4"]
    cmd += ["eval.enabled=false", "log_with=[]", "optim.lr=1e-3", "bf16_autocast=false"]
    cmd += [f"output_dir={out}", f"rewards=[{{func: '{reward}:longer', weight: 1.0}}]", *extra]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    log = open(out.parent / f"{out.name}.log", "w")  # noqa: SIM115 - closed with the process
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)


@pytest.fixture(scope="module")
def reward(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("zero_rewards") / "length.py"
    path.write_text(
        "def longer(prompts, completions, **kw):\n"
        "    return [min(len(c), 40) / 40 for c in completions]\n"
    )
    return path


@pytest.mark.multiprocess
def test_zero3_shards_the_weights_and_syncs_them_exactly(tiny_llama, tmp_path, reward):
    out = tmp_path / "z3"
    small_chunks = {"RLX_ZERO3_GATHER_ELEMENTS": "60000"}  # the tiny model in about 8 gathers
    assert launch(3, tiny_llama, out, reward, "steps=2", env=small_chunks).wait(timeout=600) == 0
    log = (tmp_path / "z3.log").read_text()
    shares = re.findall(r"pg: rank (\d): DeepSpeed ZeRO-3, this rank holds ([\d.]+)", log)
    assert sorted(rank for rank, _ in shares) == ["0", "1"], log[-3000:]
    assert all(0.45 <= float(share) <= 0.55 for _, share in shares), shares
    rows = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2]
    # step 2 samples with the weights gathered and pushed, chunk by chunk, after step 1: vLLM's
    # logprobs equal the trainer's, so the sync sent the whole, updated model
    assert rows[1]["logprob_gap_max"] < 1e-4 and rows[1]["grad_norm"] > 0
    final = load_file(out / "final" / "model.safetensors")
    base = AutoModelForCausalLM.from_pretrained(tiny_llama).state_dict()
    assert set(final) >= set(base) - {"lm_head.weight"}
    assert all(final[k].shape == base[k].shape for k in final)
    assert any((final[k] - base[k]).abs().max() > 0 for k in final)  # trained, not the base


@pytest.mark.slow  # one 2-process run
@pytest.mark.multiprocess
def test_zero3_samples_with_the_hf_engine(tiny_llama, tmp_path, reward):
    """The hf rollout engine keeps a whole copy of the model under ZeRO-3 (loaded outside
    deepspeed.zero.Init, which left it empty slices: "'weight' must be 2-D"), and the gathered
    sync after step 1 makes its logprobs the trainer's."""
    out = tmp_path / "z3hf"
    assert (
        launch(3, tiny_llama, out, reward, "steps=2", "rollout.backend=hf").wait(timeout=600) == 0
    )
    log = (tmp_path / "z3hf.log").read_text()
    assert "DeepSpeed ZeRO-3" in log, log[-3000:]
    rows = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2]
    assert rows[1]["logprob_gap_max"] < 1e-4 and rows[1]["grad_norm"] > 0


@pytest.mark.slow  # three 2-process runs, about 50 s here
@pytest.mark.multiprocess
def test_zero2_sigkill_then_resume_matches_uninterrupted_run(tiny_llama, tmp_path, reward):
    common = ("steps=4", "save_every=1")
    full = tmp_path / "full"
    assert launch(2, tiny_llama, full, reward, *common).wait(timeout=600) == 0
    assert "DeepSpeed ZeRO-2" in (tmp_path / "full.log").read_text()

    killed = tmp_path / "killed"
    crash = {CRASH_AFTER_CHECKPOINT: "2"}  # every rank SIGKILLs itself after checkpoint 2
    assert launch(2, tiny_llama, killed, reward, *common, env=crash).wait(timeout=600) != 0
    assert not (killed / "checkpoints" / "step-000004").exists()
    resumed = launch(2, tiny_llama, killed, reward, *common, "resume_from=latest")
    assert resumed.wait(timeout=600) == 0, (tmp_path / "killed.log").read_text()[-3000:]

    a, b = read_metrics(full / "metrics.jsonl"), read_metrics(killed / "metrics.jsonl")
    assert [r["step"] for r in b] == [1, 2, 3, 4]
    for ra, rb in zip(a, b, strict=True):
        assert ra["reward_mean"] == rb["reward_mean"], ra["step"]
        assert ra["loss"] == pytest.approx(rb["loss"], rel=1e-6, abs=1e-9), ra["step"]


@pytest.mark.slow  # one 2-process run, about 20 s here
@pytest.mark.multiprocess
def test_zero2_trains_lora_and_syncs_the_merged_weights(tiny_llama, tmp_path, reward):
    out = tmp_path / "z2lora"
    assert (
        launch(2, tiny_llama, out, reward, "steps=2", "adapter.method=lora").wait(timeout=600) == 0
    )
    assert "DeepSpeed ZeRO-2" in (tmp_path / "z2lora.log").read_text()
    rows = read_metrics(out / "metrics.jsonl")
    assert rows[1]["grad_norm"] > 0 and rows[1]["logprob_gap_max"] < 1e-4


def test_zero3_with_lora_is_a_config_error():
    """Refused before any process group: one line naming the supported alternative."""
    from types import SimpleNamespace

    from rlx import sharding
    from rlx.config import ConfigError

    plugin = SimpleNamespace(zero_stage=3, deepspeed_config={})
    accelerator = SimpleNamespace(state=SimpleNamespace(deepspeed_plugin=plugin))
    with pytest.raises(ConfigError, match="adapter.method.*cpu_2proc_zero2.yaml"):
        sharding.configure(accelerator, 1.0, adapter=True)
    sharding.configure(accelerator, 0.5, adapter=False)
    assert plugin.deepspeed_config["gradient_clipping"] == 0.5


# recipes/pg.py with faults injected, per rank, by update (Trainer.update calls) and micro-batch;
# every update saves this rank's weights (its ZeRO-3 slice) before and after it
FAULTY_RECIPE = """
import importlib.util, math, os, sys
from pathlib import Path
import torch

spec = importlib.util.spec_from_file_location("pg_recipe", {recipe!r})
recipe = importlib.util.module_from_spec(spec)
spec.loader.exec_module(recipe)
rank, out = int(os.environ.get("RANK", "0")), Path({out!r})
state = {{"update": 0, "pass": 0}}


def local_weights(engine):
    params = engine.module.parameters()
    return torch.cat([getattr(p, "ds_tensor", p).detach().flatten().clone() for p in params])


update, loss = recipe.Trainer.update, recipe.pg.clipped_policy_loss
logits = recipe.completion_logits


def saving_update(self, *args):
    state["update"] += 1
    state["pass"] = 0
    before = local_weights(self.model)
    stats = update(self, *args)
    saved = {{"before": before, "after": local_weights(self.model)}}
    torch.save(saved, out / f"update{{state['update']}}-rank{{rank}}.pt")
    return stats


def nan_loss(*args, **kwargs):  # update 2: rank 0's last micro-batch
    per_token, low, high = loss(*args, **kwargs)
    state["pass"] += 1
    if (state["update"], state["pass"], rank) == (2, 2, 0):
        per_token = per_token * math.nan
    return per_token, low, high


class InfGradient(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * math.inf


def inf_gradient(model, mb):  # update 3: rank 1's first micro-batch, its loss finite
    out = logits(model, mb)
    if torch.is_grad_enabled() and (state["update"], state["pass"], rank) == (3, 0, 1):
        out = InfGradient.apply(out)
    return out


recipe.Trainer.update = saving_update
recipe.pg.clipped_policy_loss = nan_loss
recipe.completion_logits = inf_gradient
sys.exit(recipe.main())
"""


@pytest.mark.slow  # one 2-process run each, 3 to 4 minutes here
@pytest.mark.multiprocess
@pytest.mark.parametrize("stage", [2, 3])
def test_zero_skips_a_non_finite_step_with_nothing_applied(tiny_llama, tmp_path, reward, stage):
    """bad_steps=skip under ZeRO-2 and ZeRO-3, two micro-batches per update: update 2's loss is NaN
    on rank 0's last micro-batch (after the first was accumulated), update 3's gradient is inf on
    rank 1's first micro-batch with a finite loss. Both steps are skipped on both ranks with every
    weight as before them; updates 1 and 4 train. ZeRO-2 runs with DeepSpeed's gradient norm off
    (compute_grad_norm=false, no clipping), so DeepSpeed's own overflow check does not catch it:
    before the fix, ZeRO-2 applied the NaN update and ZeRO-3 stopped with FloatingPointError."""
    out = tmp_path / f"z{stage}skip"
    out.mkdir()
    script = tmp_path / "faulty_pg.py"
    script.write_text(FAULTY_RECIPE.format(recipe=str(RECIPE), out=str(out)))
    extra, config = [], None  # ZeRO-3 samples on vLLM: the hf engine would load under zero.Init
    if stage == 2:
        ds = {
            "zero_optimization": {"stage": 2, "compute_grad_norm": False},
            "train_micro_batch_size_per_gpu": 1,
            "gradient_accumulation_steps": 1,
            "gradient_clipping": "auto",
            "bf16": {"enabled": False},
        }
        (tmp_path / "zero2.json").write_text(json.dumps(ds))
        config = tmp_path / "zero2.yaml"
        base = (ROOT / "launch" / "cpu_2proc_zero2.yaml").read_text()
        config.write_text(base.replace("launch/deepspeed/zero2.json", str(tmp_path / "zero2.json")))
        extra = ["optim.max_grad_norm=0", "rollout.backend=hf"]  # DeepSpeed clips with its norm
    args = ("steps=4", "bad_steps=skip", *extra)
    run = launch(stage, tiny_llama, out, reward, *args, script=script, config=config)
    log = tmp_path / f"{out.name}.log"
    assert run.wait(timeout=900) == 0, log.read_text()[-3000:]
    rows = read_metrics(out / "metrics.jsonl")
    skipped = [r["step"] for r in rows if r.get("skipped") == "non-finite loss"]
    assert len(rows) == 4 and len(skipped) == 2, rows
    for rank in (0, 1):
        saved = [torch.load(out / f"update{n}-rank{rank}.pt") for n in (1, 2, 3, 4)]
        changed = [not torch.equal(s["before"], s["after"]) for s in saved]
        assert changed == [True, False, False, True], (rank, changed)
        assert all(bool(s["after"].isfinite().all()) for s in saved)
        assert torch.equal(saved[1]["before"], saved[0]["after"])  # nothing in between


@pytest.mark.slow  # one 2-process run, 1 to 2 minutes here
@pytest.mark.multiprocess
def test_zero3_keeps_the_updates_applied_before_a_non_finite_one(tiny_llama, tmp_path, reward):
    """algo.mini_batches=2 under ZeRO-3: step 2's second update has a NaN loss on rank 0 after its
    first was applied. DeepSpeed's partitioned optimizer state has no copy to restore, so the step
    keeps that first update, drops the failed one and counts as trained (the loop syncs its
    weights); step 3's first update has an inf gradient on rank 1 and is skipped with nothing
    applied. Before the fix, step 2 stopped the run with FloatingPointError."""
    out = tmp_path / "z3applied"
    out.mkdir()
    script = tmp_path / "faulty_pg.py"
    script.write_text(FAULTY_RECIPE.format(recipe=str(RECIPE), out=str(out)))
    args = ("steps=3", "bad_steps=skip", "algo.mini_batches=2")
    run = launch(3, tiny_llama, out, reward, *args, script=script)
    log = tmp_path / "z3applied.log"
    assert run.wait(timeout=900) == 0, log.read_text()[-3000:]
    assert "update(s) that DeepSpeed applied; they are kept" in log.read_text()
    rows = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3], rows
    assert (rows[1]["updates"], rows[1]["dropped_updates"]) == (1, 1), rows[1]
    assert "skipped" not in rows[1] and rows[2].get("skipped") == "non-finite loss", rows
    for rank in (0, 1):
        saved = [torch.load(out / f"update{n}-rank{rank}.pt") for n in (1, 2, 3)]
        changed = [not torch.equal(s["before"], s["after"]) for s in saved]
        assert changed == [True, True, False], (rank, changed)
        assert all(bool(s["after"].isfinite().all()) for s in saved)
