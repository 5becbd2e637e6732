"""What deterministic resume rests on: each step's prompts are a pure function of (seed, step), a
checkpoint restores weights, optimizer, scheduler and every RNG exactly and is written atomically,
and metrics.jsonl is cut back to the checkpoint's step."""

from __future__ import annotations

import copy
import json
import math
import os
import random

import numpy as np
import pytest
import torch

from rlx.checkpoint import (
    CheckpointError,
    checkpoint_root,
    find_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from rlx.data import step_prompt_indices
from rlx.metrics import MetricsLog, read_metrics, truncate_metrics

# --- step_prompt_indices -------------------------------------------------------------------------


def test_step_indices_are_a_pure_function_of_the_arguments():
    first = step_prompt_indices(5, 8, 100, seed=3)
    np.random.seed(123)  # global RNG state must not matter
    random.seed(7)
    assert step_prompt_indices(5, 8, 100, seed=3) == first
    assert len(first) == 8
    assert all(isinstance(i, int) for i in first)


def test_step_indices_differ_between_steps_and_stay_in_range():
    steps = [step_prompt_indices(step, 8, 100, seed=0) for step in range(40)]
    for indices in steps:
        assert all(0 <= i < 100 for i in indices)
    assert all(a != b for a, b in zip(steps, steps[1:], strict=False))
    # Within one epoch (steps 0..11 cover positions 0..95) two steps never share a prompt.
    in_epoch = [set(s) for s in steps[:12]]
    for i, a in enumerate(in_epoch):
        for b in in_epoch[i + 1 :]:
            assert not a & b


@pytest.mark.parametrize(("per_step", "size"), [(4, 12), (8, 100), (3, 7), (1, 5), (10, 4)])
def test_each_epoch_is_a_permutation_of_the_dataset(per_step, size):
    """Consecutive slices of a per-epoch shuffle: the positions epoch*size .. (epoch+1)*size-1,
    read across step boundaries, hold every index exactly once."""
    epochs = 3
    num_steps = math.ceil(epochs * size / per_step)
    order = [i for step in range(num_steps) for i in step_prompt_indices(step, per_step, size, 11)]
    for epoch in range(epochs):
        assert sorted(order[epoch * size : (epoch + 1) * size]) == list(range(size))
    if size >= 12:  # reshuffled every epoch
        assert order[:size] != order[size : 2 * size]


def test_step_indices_depend_on_the_seed():
    assert step_prompt_indices(0, 16, 1000, seed=0) != step_prompt_indices(0, 16, 1000, seed=1)
    assert step_prompt_indices(7, 16, 1000, seed=0) != step_prompt_indices(7, 16, 1000, seed=1)


def test_step_indices_are_the_shuffled_order_sliced():
    """A resumed run at step k reads what an uninterrupted run read at step k, whatever the
    order the steps are asked for."""
    forward = [step_prompt_indices(s, 5, 23, 2) for s in range(10)]
    backward = [step_prompt_indices(s, 5, 23, 2) for s in reversed(range(10))][::-1]
    assert forward == backward
    whole = [i for s in forward for i in s]
    assert whole[5:10] == step_prompt_indices(1, 5, 23, 2)
    assert whole[20:30] == step_prompt_indices(2, 10, 23, 2)  # the same slice at another per_step


# --- checkpoints ---------------------------------------------------------------------------------


@pytest.fixture
def trainer(tiny_llama):
    """(model, optimizer, scheduler) after one optimizer and one scheduler step."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0 / (1 + s))
    train_step(model, optimizer, scheduler)
    return model, optimizer, scheduler


def train_step(model, optimizer, scheduler):
    """One step on a batch drawn from torch's global RNG (so the RNG state matters)."""
    ids = torch.randint(3, model.config.vocab_size, (2, 6))
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    scheduler.step()


def weights(model) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same_tensors(a: dict, b: dict):
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def assert_same_optimizer(a: dict, b: dict):
    assert a["param_groups"] == b["param_groups"]
    assert a["state"].keys() == b["state"].keys()
    for param, state in a["state"].items():
        assert state.keys() == b["state"][param].keys()
        for name, value in state.items():
            other = b["state"][param][name]
            if torch.is_tensor(value):
                assert torch.equal(value, other), (param, name)
            else:
                assert value == other, (param, name)


def draws() -> tuple:
    return torch.rand(4), random.random(), np.random.rand(3)


def perturb(model, optimizer, scheduler):
    train_step(model, optimizer, scheduler)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    torch.manual_seed(999)
    random.seed(999)
    np.random.seed(999)


def test_checkpoint_round_trip_restores_everything(trainer, tmp_path):
    model, optimizer, scheduler = trainer
    torch.manual_seed(1)
    random.seed(1)
    np.random.seed(1)
    folder = save_checkpoint(tmp_path, 3, model, optimizer, scheduler, {"data_position": 24})
    assert folder == checkpoint_root(tmp_path) / "step-000003"
    saved_weights = weights(model)
    saved_optimizer = copy.deepcopy(optimizer.state_dict())
    saved_scheduler = copy.deepcopy(scheduler.state_dict())
    expected_draws = draws()  # what the generators give right after the save
    # What an uninterrupted run does next: one more step from the saved state.
    torch.manual_seed(1)
    random.seed(1)
    np.random.seed(1)
    draws()
    train_step(model, optimizer, scheduler)
    uninterrupted = weights(model)

    perturb(model, optimizer, scheduler)
    assert not torch.equal(weights(model)["lm_head.weight"], saved_weights["lm_head.weight"])
    assert scheduler.state_dict()["last_epoch"] != saved_scheduler["last_epoch"]

    state = load_checkpoint(find_checkpoint(tmp_path, "latest"), model, optimizer, scheduler)
    assert state == {"step": 3, "data_position": 24}
    assert_same_tensors(weights(model), saved_weights)
    assert_same_optimizer(optimizer.state_dict(), saved_optimizer)
    assert scheduler.state_dict() == saved_scheduler
    assert optimizer.param_groups[0]["lr"] == saved_optimizer["param_groups"][0]["lr"]
    got = draws()
    assert torch.equal(got[0], expected_draws[0])
    assert got[1] == expected_draws[1]
    assert np.array_equal(got[2], expected_draws[2])
    # ... so the resumed run's next step is the uninterrupted run's.
    train_step(model, optimizer, scheduler)
    assert_same_tensors(weights(model), uninterrupted)


def test_find_checkpoint_latest_picks_the_highest_step(trainer, tmp_path):
    model, optimizer, scheduler = trainer
    for step in (2, 10, 9):
        save_checkpoint(tmp_path, step, model, optimizer, scheduler, {})
    root = checkpoint_root(tmp_path)
    assert find_checkpoint(tmp_path, "latest") == root / "step-000010"
    assert json.loads((root / "step-000010" / "state.json").read_text())["step"] == 10
    assert find_checkpoint(tmp_path, str(root / "step-000002")) == root / "step-000002"
    with pytest.raises(CheckpointError):
        find_checkpoint(tmp_path / "elsewhere", "latest")
    with pytest.raises(CheckpointError):
        find_checkpoint(tmp_path, str(root / "step-000004"))


def test_crash_while_saving_leaves_no_partial_checkpoint(trainer, tmp_path, monkeypatch):
    model, optimizer, scheduler = trainer
    save_checkpoint(tmp_path, 3, model, optimizer, scheduler, {"data_position": 24})
    saved_weights = weights(model)
    saved_optimizer = copy.deepcopy(optimizer.state_dict())
    train_step(model, optimizer, scheduler)

    real_save = torch.save

    def crash_on_rng(obj, f, *args, **kwargs):
        if str(f).endswith("rng.pt"):
            raise OSError("disk full")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", crash_on_rng)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(tmp_path, 5, model, optimizer, scheduler, {"data_position": 40})
    with pytest.raises(OSError, match="disk full"):  # re-saving step 3 must not lose step 3 either
        save_checkpoint(tmp_path, 3, model, optimizer, scheduler, {"data_position": 24})
    monkeypatch.setattr(torch, "save", real_save)

    root = checkpoint_root(tmp_path)
    assert sorted(p.name for p in root.iterdir()) == ["step-000003"]  # no step-5, no .tmp-*
    assert find_checkpoint(tmp_path, "latest") == root / "step-000003"
    perturb(model, optimizer, scheduler)
    state = load_checkpoint(root / "step-000003", model, optimizer, scheduler)
    assert state == {"step": 3, "data_position": 24}
    assert_same_tensors(weights(model), saved_weights)
    assert_same_optimizer(optimizer.state_dict(), saved_optimizer)


def test_resaving_a_step_replaces_it(trainer, tmp_path):
    model, optimizer, scheduler = trainer
    save_checkpoint(tmp_path, 3, model, optimizer, scheduler, {"data_position": 1})
    train_step(model, optimizer, scheduler)
    second = weights(model)
    second_scheduler = copy.deepcopy(scheduler.state_dict())
    save_checkpoint(tmp_path, 3, model, optimizer, scheduler, {"data_position": 2})

    root = checkpoint_root(tmp_path)
    assert sorted(p.name for p in root.iterdir()) == ["step-000003"]
    perturb(model, optimizer, scheduler)
    state = load_checkpoint(root / "step-000003", model, optimizer, scheduler)
    assert state == {"step": 3, "data_position": 2}
    assert_same_tensors(weights(model), second)
    assert scheduler.state_dict() == second_scheduler


def test_load_refuses_a_checkpoint_of_another_model(trainer, tmp_path, tiny_tied):
    from transformers import AutoModelForCausalLM

    model, optimizer, scheduler = trainer
    folder = save_checkpoint(tmp_path, 1, model, optimizer, scheduler, {})
    (folder / "rng.pt").unlink()
    with pytest.raises(CheckpointError, match="rng.pt"):
        load_checkpoint(folder, model, optimizer, scheduler)
    other = AutoModelForCausalLM.from_pretrained(tiny_tied, dtype=torch.float32)
    other.model.layers = other.model.layers[:1]  # a different architecture: keys do not match
    with pytest.raises(CheckpointError, match="does not match"):
        load_checkpoint(folder, other, optimizer, scheduler)


# --- metrics.jsonl -------------------------------------------------------------------------------


def write_rows(path, steps):
    log = MetricsLog(path)
    for step in steps:
        log.log({"step": step, "reward_mean": 0.1 * step + 1 / 3, "loss": math.nan, "tag": "é"})


def test_truncate_drops_later_rows_and_keeps_earlier_ones_byte_for_byte(tmp_path):
    path = tmp_path / "metrics.jsonl"
    write_rows(path, range(1, 8))
    lines = path.read_bytes().splitlines(keepends=True)
    truncate_metrics(path, 4)
    assert path.read_bytes() == b"".join(lines[:4])
    assert [row["step"] for row in read_metrics(path)] == [1, 2, 3, 4]
    # Appending after the cut continues the file as one run.
    write_rows(path, [5])
    assert [row["step"] for row in read_metrics(path)] == [1, 2, 3, 4, 5]
    truncate_metrics(path, 0)
    assert read_metrics(path) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl"]  # no temp file left


def test_truncate_at_or_past_the_last_step_changes_nothing(tmp_path):
    path = tmp_path / "metrics.jsonl"
    write_rows(path, range(1, 4))
    before = path.read_bytes()
    truncate_metrics(path, 3)
    assert path.read_bytes() == before
    truncate_metrics(path, 100)
    assert path.read_bytes() == before


def test_truncate_a_missing_file_is_fine(tmp_path):
    path = tmp_path / "metrics.jsonl"
    truncate_metrics(path, 3)
    assert read_metrics(path) == []
    assert {p.name for p in tmp_path.iterdir()} <= {"metrics.jsonl"}
    if path.exists():
        assert path.read_bytes() == b""


def test_truncate_is_atomic(tmp_path, monkeypatch):
    """A crash before the rename leaves the old file whole and no temporary file behind."""
    path = tmp_path / "metrics.jsonl"
    write_rows(path, range(1, 6))
    before = path.read_bytes()

    def crash(*args, **kwargs):
        raise OSError("crash before rename")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="crash before rename"):
        truncate_metrics(path, 2)
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl"]


def test_a_torn_last_metrics_row_is_dropped_on_resume(tmp_path):
    """A crash in the middle of an append leaves a last line without its newline: resuming drops
    it instead of failing on it, and keeps the complete rows."""
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 0.5}\n{"step": 2, "loss": 0.4}\n{"step": 3, "lo')
    truncate_metrics(path, 5)
    assert path.read_text() == '{"step": 1, "loss": 0.5}\n{"step": 2, "loss": 0.4}\n'


def test_latest_is_the_highest_step_numerically(tmp_path):
    """Past step 999999 the folder names no longer sort as text; "latest" still finds the last."""
    for step in (999_999, 1_000_000):
        folder = tmp_path / "checkpoints" / f"step-{step:06d}"
        folder.mkdir(parents=True)
        (folder / "state.json").write_text(json.dumps({"step": step}))
    assert find_checkpoint(tmp_path, "latest").name == "step-1000000"
