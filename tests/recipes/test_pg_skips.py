"""A skipped step is not a rollback, and schedules must not drift (issue 31, items 7 and 8):
finiteness is checked before each optimizer step, a skipped step with several updates leaves the
weights exactly as they were, the learning-rate schedule and AdaLoRA's rank budget count skipped
steps, and the optimizer updates are counted into the checkpoint."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file
from test_pg_loop import load_recipe, overrides

from rlx import sharding
from rlx.config import PGConfig, load_config
from rlx.metrics import read_metrics


@pytest.fixture
def flaky_reward(tmp_path):
    """A length reward that fails once, on its first call while the flag file exists."""
    flag = tmp_path / "fail_once"
    flag.touch()
    path = tmp_path / "flaky.py"
    path.write_text(
        "from pathlib import Path\n"
        f"FLAG = Path({str(flag)!r})\n"
        "def longer(prompts, completions, **kw):\n"
        "    if FLAG.exists():\n"
        "        FLAG.unlink()\n"
        "        raise RuntimeError('flaky')\n"
        "    return [min(len(c), 40) / 40 for c in completions]\n"
    )
    return f"{path}:longer"


def test_optimizer_step_with_a_non_finite_gradient_takes_no_step():
    """The plain-torch step: an inf in a gradient (the loss may still be finite) -> no step, the
    gradients dropped, None; before the fix AdamW stepped on it (NaN weights)."""
    weight = torch.nn.Parameter(torch.ones(3))
    optimizer = torch.optim.AdamW([weight], lr=0.1)
    accelerator = SimpleNamespace(
        state=SimpleNamespace(deepspeed_plugin=None),
        clip_grad_norm_=torch.nn.utils.clip_grad_norm_,
    )
    for max_norm in (1.0, 0.0):  # the clip's norm, or a finiteness check of its own
        weight.grad = torch.tensor([1.0, math.inf, 0.0])
        assert sharding.optimizer_step(accelerator, None, optimizer, [weight], max_norm) is None
        assert torch.equal(weight.detach(), torch.ones(3)) and weight.grad is None
        assert not optimizer.state
    weight.grad = torch.tensor([1.0, 1.0, 0.0])
    assert sharding.optimizer_step(accelerator, None, optimizer, [weight], 1.0) > 0
    assert weight.detach()[0] < 1


class FakeEngine(torch.nn.Module):
    """What the loop calls on a DeepSpeed engine, over one weight: backward without a step, the
    step, the norm, the boundary switch, and a ZeRO-3 optimizer holding reduced gradients."""

    def __init__(self):
        super().__init__()
        self.module = torch.nn.Linear(3, 1, bias=False)
        self.steps = []
        self.optimizer = SimpleNamespace(
            zero_grad=lambda set_to_none: self.module.zero_grad(set_to_none=set_to_none),
            averaged_gradients={},
            ipg_buckets={},
        )

    def set_gradient_accumulation_boundary(self, last: bool) -> None:
        pass

    def backward(self, loss) -> None:
        loss.backward()
        self.optimizer.averaged_gradients[0] = self.module.weight.grad  # "reduced"

    def step(self) -> None:
        self.steps.append(self.module.weight.grad.clone())

    def get_global_grad_norm(self) -> float:
        return 0.5


def test_deepspeed_update_checks_the_loss_and_the_gradient_before_the_engine_steps():
    """Under DeepSpeed the loop runs the engine's backward and step itself: a non-finite loss never
    reaches the engine's backward, a non-finite gradient with a finite loss never reaches its
    step, and the reduced gradients are dropped. (Before the fix accelerate's backward stepped
    the engine inside the last backward, before any check.)"""
    plugin = SimpleNamespace(zero_stage=3)
    accelerator = SimpleNamespace(state=SimpleNamespace(deepspeed_plugin=plugin))
    engine = FakeEngine()
    x = torch.ones(1, 3)

    def loss(scale: float = 1.0, poison: bool = False):
        out = engine.module(x)
        if poison:  # a finite loss whose gradient is not
            out.register_hook(lambda grad: grad * math.nan)
        return out.sum() * scale

    assert not sharding.backward(accelerator, engine, loss(math.nan))
    assert engine.module.weight.grad is None  # its backward was not run
    assert sharding.backward(accelerator, engine, loss(poison=True))
    assert sharding.optimizer_step(accelerator, engine, None, [], 1.0) is None
    assert engine.steps == [] and engine.module.weight.grad is None
    assert engine.optimizer.averaged_gradients == {}
    assert sharding.backward(accelerator, engine, loss())
    assert sharding.optimizer_step(accelerator, engine, None, [], 1.0) == 0.5
    assert len(engine.steps) == 1 and torch.equal(engine.steps[0], torch.ones(1, 3))


def test_skipped_two_update_step_leaves_the_weights_as_they_were(
    tiny_llama, tmp_path, flaky_reward, monkeypatch
):
    """algo.mini_batches=2, the second mini-batch's loss NaN, bad_steps=skip: the first
    mini-batch's update is undone (before the fix it stayed applied, unsynced)."""
    recipe = load_recipe()
    real, calls = recipe.pg.clipped_policy_loss, []

    def nan_second_update(*args, **kwargs):
        per_token, low, high = real(*args, **kwargs)
        calls.append(1)
        return per_token * (math.nan if len(calls) == 2 else 1.0), low, high

    monkeypatch.setattr(recipe.pg, "clipped_policy_loss", nan_second_update)
    (tmp_path / "fail_once").unlink()  # the reward does not fail here
    extra = {"eval.enabled": "false", "steps": 1, "bad_steps": "skip", "algo.mini_batches": 2}
    extra["rollout.backend"] = "hf"  # no vLLM engine to start: a few seconds
    recipe.train(
        load_config(PGConfig, overrides=overrides(tiny_llama, tmp_path, flaky_reward, **extra))
    )
    (row,) = read_metrics(tmp_path / "metrics.jsonl")
    assert row["skipped"] == "non-finite loss" and len(calls) == 2
    base, final = (
        load_file(f"{tiny_llama}/model.safetensors"),
        load_file(tmp_path / "final" / "model.safetensors"),
    )
    for name, tensor in base.items():
        assert torch.equal(final[name], tensor), name


@pytest.mark.slow  # two short runs with a vLLM engine each
def test_schedule_counts_skipped_steps_and_adalora_follows_the_rollout_steps(
    tiny_llama, tmp_path, flaky_reward, monkeypatch
):
    """Step 1 skipped (its reward fails), linear decay over steps=3: steps 2 and 3 train with
    the LRs of steps 2 and 3 (before the fix: of steps 1 and 2, the schedule one step behind).
    AdaLoRA's budget (total_step 3) follows the rollout steps too: the updates of steps 2 and 3
    allocate at 2 and 3, and step 3 fixes the final pattern at the target rank (before: at 1 and
    2, the budget never fixed). The checkpoint of step 2, saved after a pruning, loads into a
    fresh model (before: PEFT's save had dropped the pruned ranks), and the resumed run allocates
    at 3 and fixes the same pattern, which only the checkpointed allocator state decides."""
    from peft.tuners.adalora import AdaLoraModel

    recipe = load_recipe()
    lrs, allocations = [], []
    step, allocate = sharding.optimizer_step, AdaLoraModel.update_and_allocate

    def spy_step(accelerator, model, optimizer, *args):
        lrs.append(optimizer.param_groups[0]["lr"])
        return step(accelerator, model, optimizer, *args)

    def spy_allocate(self, global_step):
        allocations.append(global_step)
        return allocate(self, global_step)

    monkeypatch.setattr(recipe.sharding, "optimizer_step", spy_step)
    monkeypatch.setattr(AdaLoraModel, "update_and_allocate", spy_allocate)
    extra = {
        "eval.enabled": "false",
        "bad_steps": "skip",
        "save_every": 1,
        "optim.schedule": "linear",
        "adapter.method": "adalora",
        "adapter.rank": 4,
        "adapter.adalora.target_rank": 2,
    }
    args = overrides(tiny_llama, tmp_path, flaky_reward, **extra)
    recipe.train(load_config(PGConfig, overrides=args))
    assert lrs == pytest.approx([1e-3 * 2 / 3, 1e-3 / 3])
    assert allocations == [2, 3]
    ckpt = tmp_path / "checkpoints"
    states = {d.name: json.loads((d / "state.json").read_text()) for d in ckpt.iterdir()}
    assert states["step-000002"]["optimizer_updates"] == 1
    assert states["step-000003"]["optimizer_updates"] == 2

    def final_pattern() -> dict:
        tensors = torch.load(ckpt / "step-000003" / "loop_tensors.pt")
        assert int(tensors["adalora.step"]) == 3
        return {k: v for k, v in tensors.items() if k.startswith("adalora.rank_pattern/")}

    pattern = final_pattern()
    assert sum(int(keep.sum()) for keep in pattern.values()) == 2 * len(pattern)

    lrs.clear(), allocations.clear()
    resume = [*args, f"resume_from={ckpt / 'step-000002'}"]
    recipe.train(load_config(PGConfig, overrides=resume))
    assert allocations == [3] and lrs == pytest.approx([1e-3 / 3])
    resumed = final_pattern()
    assert resumed.keys() == pattern.keys()
    assert all(torch.equal(resumed[k], pattern[k]) for k in pattern)
