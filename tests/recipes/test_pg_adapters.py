"""recipes/pg.py with the adapter layer (rlx/adapters): AdaLoRA's allocation and penalty, the
principal guard on full fine-tuning, the logged diagnostics and the adapter-only sync."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from test_pg_loop import load_recipe, overrides

import rlx.adapters
from rlx.config import PGConfig, load_config
from rlx.metrics import read_metrics

K = 4


@pytest.fixture(scope="module")
def longer(tmp_path_factory) -> str:
    """A reward a tiny random model can move: longer completions score higher."""
    path = tmp_path_factory.mktemp("rewards") / "length.py"
    path.write_text(
        "def longer(prompts, completions, **kw):\n"
        "    return [min(len(c), 40) / 40 for c in completions]\n"
    )
    return f"{path}:longer"


def run(tiny_llama, out, reward, **extra):
    base = {"eval.enabled": "false", "steps": 2}
    cfg = load_config(PGConfig, overrides=overrides(tiny_llama, out, reward, **(base | extra)))
    load_recipe().train(cfg)
    return read_metrics(out / "metrics.jsonl")


def matrices(folder) -> dict[str, torch.Tensor]:
    """The 2-D projection weights of a saved model (float64)."""
    state = load_file(f"{folder}/model.safetensors")
    return {n: t.double() for n, t in state.items() if n.endswith("proj.weight")}


def test_adalora_run_allocates_every_update_and_adds_its_penalty(
    tiny_llama, tmp_path, longer, monkeypatch
):
    from peft.tuners.adalora import AdaLoraModel

    allocations, penalties = [], []
    allocate, penalty = AdaLoraModel.update_and_allocate, rlx.adapters.extra_loss

    def spy_allocate(self, step):
        allocations.append(step)
        return allocate(self, step)

    def spy_penalty(model):
        penalties.append(float(penalty(model)))
        return penalty(model)

    monkeypatch.setattr(AdaLoraModel, "update_and_allocate", spy_allocate)
    monkeypatch.setattr(rlx.adapters, "extra_loss", spy_penalty)
    extra = {"adapter.method": "adalora", "adapter.rank": 4, "adapter.adalora.target_rank": 2}
    rows = run(tiny_llama, tmp_path, longer, **extra)
    assert allocations == [1, 2]  # one optimizer step per rollout step, counted from 1
    assert penalties and all(p > 0 for p in penalties)  # A, B start random: not orthogonal
    assert all(r["logprob_gap_max"] < 0.05 for r in rows)  # merged AdaLoRA reached vLLM
    before, after = matrices(tiny_llama), matrices(tmp_path / "final")
    assert max(float((after[n] - before[n]).abs().max()) for n in before) > 1e-6


def test_guarded_full_fine_tuning_stays_off_the_principals_and_logs_diagnostics(
    tiny_llama, tmp_path, longer
):
    extra = {"adapter.principal_guard": K, "adapter.diagnostics_every": 1, "optim.lr": 1e-2}
    extra["adapter.diagnostics_top_k"] = K
    rows = run(tiny_llama, tmp_path, longer, **extra)
    for r in rows:  # the probe sees what the guard does: nothing in the principal subspaces
        assert 0 <= r["diag/bf16_sparsity"] < 1  # lr 1e-2 moves entries past bf16 rounding
        assert r["diag/principal_share"] < 1e-5 and r["diag/alignment"] < 1e-5
    before, after = matrices(tiny_llama), matrices(tmp_path / "final")
    for name, w0 in before.items():
        u, _, vh = torch.linalg.svd(w0, full_matrices=False)
        dw = after[name] - w0  # [O, I]
        norm = torch.linalg.matrix_norm(dw)
        assert norm > 1e-4, f"{name} did not train"
        assert torch.linalg.matrix_norm(u[:, :K].T @ dw @ vh[:K].T) / norm < 1e-6, name


@pytest.mark.slow
def test_adapter_sync_run_samples_from_the_trainers_adapter(tiny_llama, tmp_path, longer):
    """adapter.sync=adapter in the loop: the logprob gap (engine vs trainer, both fp32) stays at
    rounding level while lr 1e-2 moves the adapter; no version is left on disk at the end."""
    extra = {
        "adapter.method": "lora",
        "adapter.rank": 8,
        "adapter.sync": "adapter",
        "rollout.enable_lora": "true",
        "rollout.max_lora_rank": 8,
        "optim.lr": 1e-2,
        "steps": 3,
        "bf16_autocast": "false",
    }
    rows = run(tiny_llama, tmp_path, longer, **extra)
    assert all(r["logprob_gap_max"] < 1e-3 for r in rows)
    assert not list((tmp_path / "adapter_sync").iterdir())  # the engine's close cleans up
