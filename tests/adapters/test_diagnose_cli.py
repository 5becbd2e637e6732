"""`rlx diagnose` on two tiny saved models: the table, the JSON and the PNG; bad input is one line
and exit status 2."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from rlx.cli import main

Q = "model.layers.0.self_attn.q_proj.weight"
UP = "model.layers.1.mlp.up_proj.weight"


def finetuned_copy(base: str, out, edit) -> str:
    """A copy of the model folder `base` whose weights went through edit(dict)."""
    shutil.copytree(base, out)
    weights = load_file(f"{out}/model.safetensors")
    edit(weights)
    save_file(weights, f"{out}/model.safetensors", metadata={"format": "pt"})
    return str(out)


def principal_update(weights: dict) -> None:
    """q_proj: an update inside W0's top-2 subspaces; up_proj: one orthogonal to them."""
    for name, inside in ((Q, True), (UP, False)):
        w = weights[name].double()
        u, _, vh = torch.linalg.svd(w, full_matrices=False)
        sl = slice(0, 2) if inside else slice(2, None)
        core = torch.randn(u[:, sl].shape[1], vh[sl].shape[0], dtype=torch.float64)
        weights[name] = (w + 0.05 * u[:, sl] @ core @ vh[sl]).float()


def test_diagnose_prints_table_and_writes_json_and_png(tiny_llama, tmp_path, capsys):
    ft = finetuned_copy(tiny_llama, tmp_path / "ft", principal_update)
    out = tmp_path / "diag"
    args = ["diagnose", "--base", tiny_llama, "--finetuned", ft, "--top-k", "2", "--out", str(out)]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "q_proj" in printed and "alignment" in printed
    result = json.loads((out / "diagnostics.json").read_text())
    rows = result["matrices"]
    assert len(rows) == 2 * 7  # every projection of both layers
    assert rows[Q]["alignment"] == pytest.approx(1.0, abs=1e-4)
    assert rows[UP]["alignment"] < 1e-4 and rows[UP]["principal_share"] < 1e-4
    assert rows["model.layers.1.self_attn.k_proj.weight"]["bf16_sparsity"] == 1.0  # untouched
    assert result["summary"]["q_proj"]["alignment"] == pytest.approx(1.0, abs=1e-4)
    assert (out / "diagnostics.png").stat().st_size > 10_000


def test_diagnose_bad_input_is_one_line_and_status_2(tiny_llama, tmp_path, capsys):
    missing = str(tmp_path / "nope")
    assert main(["diagnose", "--base", tiny_llama, "--finetuned", missing]) == 2
    err = capsys.readouterr().err.strip()
    assert "nope" in err and "does not exist" in err and "\n" not in err

    def reshape(weights):
        weights[UP] = weights[UP][:, :64].contiguous()

    ft = finetuned_copy(tiny_llama, tmp_path / "ft", reshape)
    out = str(tmp_path / "d")
    assert main(["diagnose", "--base", tiny_llama, "--finetuned", ft, "--out", out]) == 2
    err = capsys.readouterr().err.strip()
    assert UP in err and "not the same model" in err and "\n" not in err
