"""Every adapter method through a 2-step loop on a tiny model: it starts as the base model, its
parameters change, and the merged weights equal PEFT's merge_and_unload."""

from __future__ import annotations

import copy

import pytest
import torch

from rlx.adapters import merged_weights
from rlx.config import AdaLoraConfig, AdapterConfig, ConfigError
from rlx.policy import export_weights

METHODS = ["lora", "dora", "pissa", "minor", "mica", "miss", "adalora"]


def plain_weights(tiny_llama):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).state_dict()


@pytest.mark.parametrize("method", METHODS)
def test_method_trains_and_merges_like_peft(method, policy, train, tiny_llama):
    cfg = AdapterConfig(method=method, rank=4, alpha=8.0, adalora=AdaLoraConfig(target_rank=2))
    model = policy(cfg, total_steps=2)
    assert hasattr(model, "peft_config")
    w0 = plain_weights(tiny_llama)
    start = dict(merged_weights(model))
    assert start.keys() == w0.keys()
    for name, tensor in w0.items():  # the adapter starts as the identity (pissa/minor: residual)
        torch.testing.assert_close(start[name], tensor, atol=2e-6, rtol=0)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}

    train(model, cfg, steps=2)

    after = dict(model.named_parameters())
    assert any(not torch.equal(before[n], after[n]) for n in before), "no parameter changed"
    merged = dict(export_weights(model))
    q = "model.layers.0.self_attn.q_proj.weight"
    assert (merged[q] - w0[q]).abs().max() > 1e-6  # the update reached the merged weights
    reference = copy.deepcopy(model).merge_and_unload().state_dict()
    assert merged.keys() == reference.keys()
    for name, tensor in reference.items():
        torch.testing.assert_close(merged[name], tensor, atol=1e-6, rtol=0)
    # merging for the export leaves the training model exactly as it was
    assert torch.equal(dict(merged_weights(model))[q], merged[q])


def test_minor_init_starts_on_the_smallest_singular_triplets(policy):
    model = policy(AdapterConfig(method="minor", rank=4, alpha=8.0))
    layer = model.base_model.model.model.layers[0].mlp.down_proj
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    w0 = (layer.base_layer.weight + layer.scaling["default"] * b @ a).double()
    u, s, vh = torch.linalg.svd(w0, full_matrices=False)
    delta = (layer.scaling["default"] * b @ a).double()
    torch.testing.assert_close(delta, (u[:, -4:] * s[-4:]) @ vh[-4:], atol=1e-6, rtol=0)


def test_guard_refused_where_the_update_is_no_product():
    with pytest.raises(ConfigError, match="principal_guard"):
        AdapterConfig(method="dora", principal_guard=4)
    with pytest.raises(ConfigError, match="adalora.target_rank"):
        AdapterConfig(method="adalora", rank=4)  # target_rank 8 > rank 4


@pytest.mark.parametrize("method", ["minor", "mica"])
def test_guard_refused_where_it_would_cut_into_the_minor_init(method, policy):
    """k + r > min(O, I): the guard's top-k directions overlap the r minor ones the init starts
    on (k_proj of tiny_llama is 64 x 128). One line at adapter set-up, naming module and sizes."""
    cfg = AdapterConfig(method=method, rank=32, alpha=8.0, principal_guard=40)
    with pytest.raises(ConfigError, match=r"k_proj.*64x128.*40 \+ 32 > 64") as err:
        policy(cfg)
    assert "\n" not in str(err.value)
    policy(AdapterConfig(method=method, rank=32, alpha=8.0, principal_guard=32))  # 64: fits
    policy(AdapterConfig(method=method, rank=32, alpha=8.0))  # no guard: nothing to overlap


def test_adalora_hooks_allocate_and_penalise(policy, train):
    from rlx.adapters import extra_loss

    cfg = AdapterConfig(method="adalora", rank=4, adalora=AdaLoraConfig(target_rank=2))
    model = policy(cfg, total_steps=4)
    assert float(extra_loss(model).detach()) > 0  # random A, B are not orthonormal
    assert extra_loss(policy(AdapterConfig(method="lora", rank=4))) == 0.0
    hooks = train(model, cfg, steps=3)
    assert hooks.step == 3
    assert model.base_model.rankallocator.ipt  # update_and_allocate ran on the gradients
    # the budget shrank: fewer ranks kept than the initial 4 per matrix
    pattern = model.peft_config["default"].rank_pattern
    assert pattern and sum(int(sum(m)) for m in pattern.values()) < 4 * len(pattern)


def test_adalora_checkpoint_resume_is_exact_past_the_fixed_budget(policy, tmp_path):
    """Checkpoints (rlx.checkpoint, as the PG loop writes and reads them) after steps 2 and 4 of
    5, AdaLoRA pruning at every step and fixing its final pattern at step 4 (total_step 5 - tfinal
    1): a fresh model resumed from either trains to exactly the uninterrupted run's weights and
    rank pattern (from 4: step 5 masks with the restored pattern). Before the fix PEFT's save
    dropped the pruned ranks and no such checkpoint loaded. Without the allocator's state
    (StepHooks.state_dict) the allocation, and so the adapter, differs."""
    from rlx.adapters import extra_loss, install_step_hooks
    from rlx.checkpoint import load_checkpoint, load_loop_tensors, save_checkpoint

    budget = AdaLoraConfig(target_rank=2, tfinal=1, total_step=5)
    cfg = AdapterConfig(method="adalora", rank=4, adalora=budget)

    def run(start=None, tensors=True, save=()):
        model = policy(cfg)
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
        hooks = install_step_hooks(model, optimizer, cfg)
        first, saved = 0, {}
        if start is not None:
            first = load_checkpoint(start, model, optimizer, scheduler)["step"]
            hooks.resume(first, load_loop_tensors(start) if tensors else {})
        for step in range(first, 5):
            gen = torch.Generator().manual_seed(step)
            ids = torch.randint(3, 200, (2, 12), generator=gen)
            logits = model(input_ids=ids).logits[:, :-1]
            loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten())
            (loss + extra_loss(model)).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if step + 1 in save:
                state = (scheduler, {}, hooks.state_dict())
                saved[step + 1] = save_checkpoint(tmp_path, step + 1, model, optimizer, *state)
        return saved, model.state_dict(), model.peft_config["default"].rank_pattern

    saved, full, full_pattern = run(save=(2, 4))
    kept = sum(sum(m) for m in full_pattern.values())
    assert kept == 2 * len(full_pattern)  # the final budget: target_rank per matrix
    for k in (2, 4):
        _, resumed, pattern = run(saved[k])
        assert all(torch.equal(resumed[n], full[n]) for n in full), k
        assert pattern == full_pattern, k
    _, lost, _ = run(saved[2], tensors=False)
    assert any(not torch.equal(lost[n], full[n]) for n in full)


def test_an_adapter_checkpoint_of_other_shapes_is_refused_with_one_clear_error(policy, tmp_path):
    """A checkpoint whose adapter shapes are not the model's (another rank here; an AdaLoRA
    checkpoint PEFT saved with its pruned ranks dropped in the field) stops with CheckpointError
    naming the cause, not PEFT's list of size mismatches; the pruned case is told by the
    rank_pattern of the checkpoint's adapter_config.json."""
    import json

    from rlx.checkpoint import CheckpointError, load_checkpoint, save_checkpoint

    def parts(rank):
        model = policy(AdapterConfig(method="lora", rank=rank))
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
        return model, optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)

    model, optimizer, scheduler = parts(4)
    saved = save_checkpoint(tmp_path, 1, model, optimizer, scheduler, {}, {})
    with pytest.raises(CheckpointError, match="adapter settings") as err:
        load_checkpoint(saved, *parts(8))
    assert "size mismatch" in str(err.value) and "AdaLoRA" not in str(err.value)
    config_file = saved / "model" / "adapter_config.json"
    config = json.loads(config_file.read_text())
    config_file.write_text(json.dumps(config | {"rank_pattern": {"layers.0.q_proj": [True]}}))
    with pytest.raises(CheckpointError, match="AdaLoRA adapter saved with its pruned ranks"):
        load_checkpoint(saved, *parts(8))
    load_checkpoint(saved, *parts(4))  # the same shapes load


def test_adalora_budget_follows_the_rollout_steps(policy, monkeypatch):
    """StepHooks.start: rollout step s's updates take allocation steps s x 2 + 1, s x 2 + 2
    (2 updates a step at most, 4 steps: total_step 8, tfinal 2). Steps 1 and 2 make no update
    (skipped), so the steps jump over the fixing step 6: the pattern is fixed there first, at the
    target rank, and steps 7 and 8 mask with it. Counting the 4 updates made instead (before the
    fix) the budget ended at step 4, short of the target and never fixed. A first update past the
    fixing step has no scores to fix a pattern from: every rank stays."""
    from peft.tuners.adalora import AdaLoraModel

    from rlx.adapters import extra_loss, install_step_hooks

    calls, allocate = [], AdaLoraModel.update_and_allocate

    def spy(self, global_step):
        calls.append(global_step)
        return allocate(self, global_step)

    monkeypatch.setattr(AdaLoraModel, "update_and_allocate", spy)
    cfg = AdapterConfig(
        method="adalora", rank=4, adalora=AdaLoraConfig(target_rank=2, tfinal=2, total_step=8)
    )

    def train(model, updates_per_step: list[int]):
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        hooks = install_step_hooks(model, optimizer, cfg)
        for index, updates in enumerate(updates_per_step):
            hooks.start(index * 2)
            for _ in range(updates):
                ids = torch.randint(3, 200, (2, 12), generator=torch.Generator().manual_seed(index))
                logits = model(input_ids=ids).logits[:, :-1]
                loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten())
                (loss + extra_loss(model)).backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
        return hooks

    model = policy(cfg)
    assert train(model, [2, 0, 0, 2]).step == 8
    assert calls == [1, 2, 6, 7, 8]
    pattern = model.peft_config["default"].rank_pattern
    assert sum(sum(keep) for keep in pattern.values()) == 2 * len(pattern)

    calls.clear()
    model = policy(cfg)
    train(model, [0, 0, 0, 1])  # allocation step 7, nothing scored before
    assert calls == [] and model.peft_config["default"].rank_pattern is None
