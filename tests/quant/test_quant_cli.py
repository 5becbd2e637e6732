"""Bad input fails before any work with a clear error; the CLI, recipes and pseudo-fine-tuning run."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from rlx.cli import main
from rlx.config import ConfigError, EvalCommandConfig, load_config
from rlx.models.tiny import build_tiny_model
from rlx.quant import (
    CalibrationConfig,
    QuantError,
    QuantizeConfig,
    TuneConfig,
    plan_quantization,
    quantize_model,
)
from rlx.quant.calibration import arithmetic_completion, calibration_blocks
from rlx.quant.pseudo_finetune import pseudo_finetune

REPO = Path(__file__).resolve().parents[2]
SMALL = CalibrationConfig(num_sequences=2, seq_len=32)


@pytest.fixture(scope="module")
def tiny_ft(tmp_path_factory, tiny_llama):
    """tiny_llama after a small seeded update of every matrix (a stand-in fine-tune)."""
    model = AutoModelForCausalLM.from_pretrained(tiny_llama)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 2:
                p.add_(torch.randn(p.shape, generator=gen) * 1e-3)
    path = tmp_path_factory.mktemp("tiny_ft")
    model.save_pretrained(path)
    AutoTokenizer.from_pretrained(tiny_llama).save_pretrained(path)
    return str(path)


def _odd_model(path, intermediate: int) -> str:
    """A tiny Llama whose MLP width is `intermediate` (e.g. not a multiple of 32)."""
    src = Path(build_tiny_model(path / "src"))
    config = json.loads((src / "config.json").read_text())
    config["intermediate_size"] = intermediate
    from transformers import LlamaConfig

    model = AutoModelForCausalLM.from_config(LlamaConfig(**config))
    model.save_pretrained(path / "odd")
    AutoTokenizer.from_pretrained(src).save_pretrained(path / "odd")
    return str(path / "odd")


def _fails_cleanly(cfg: QuantizeConfig, match: str) -> None:
    with pytest.raises(QuantError, match=match):
        plan_quantization(cfg)
    assert not Path(cfg.out).exists()


def test_base_of_another_architecture_is_refused(tmp_path, tiny_llama, tiny_qwen2):
    cfg = QuantizeConfig(base=tiny_qwen2, finetuned=tiny_llama, out=str(tmp_path / "o"))
    _fails_cleanly(cfg, "same architecture")


def test_base_of_another_shape_is_refused(tmp_path, tiny_llama):
    other = _odd_model(tmp_path, intermediate=320)
    cfg = QuantizeConfig(base=other, finetuned=tiny_llama, out=str(tmp_path / "o"))
    _fails_cleanly(cfg, r"intermediate_size: 320 vs 256")


def test_missing_calibration_file_is_refused(tmp_path, tiny_llama):
    calib = CalibrationConfig(source=str(tmp_path / "nope.jsonl"))
    cfg = QuantizeConfig(finetuned=tiny_llama, method="awq", calib=calib, out=str(tmp_path / "o"))
    _fails_cleanly(cfg, r"nope.jsonl. is neither a registered task .* nor an existing file")


def test_layer_sizes_the_int4_kernel_cannot_serve_are_refused(tmp_path):
    odd = _odd_model(tmp_path, intermediate=208)  # 208 = 6.5 x 32
    cfg = QuantizeConfig(finetuned=odd, method="rtn", out=str(tmp_path / "o"))
    _fails_cleanly(cfg, "no group size .* divides in_features 208")
    ok = _odd_model(tmp_path / "b", intermediate=224)  # 7 x 32: served, with group size 32
    assert (
        plan_quantization(QuantizeConfig(finetuned=ok, out=str(tmp_path / "p"))).group_sizes[
            "mlp.down_proj"
        ]
        == 32
    )


def test_missing_model_and_nonempty_output_are_refused(tmp_path, tiny_llama):
    _fails_cleanly(
        QuantizeConfig(finetuned=str(tmp_path / "none"), out=str(tmp_path / "o")), "none"
    )
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("keep me")
    with pytest.raises(QuantError, match="exists and is not empty"):
        plan_quantization(QuantizeConfig(finetuned=tiny_llama, out=str(tmp_path / "full")))
    assert (tmp_path / "full" / "x").read_text() == "keep me"


def test_a_gpu_torch_does_not_see_is_refused(tmp_path, tiny_llama):
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    _fails_cleanly(
        QuantizeConfig(finetuned=tiny_llama, out=str(tmp_path / "o"), device=f"cuda:{count}"),
        f"torch sees {count} CUDA device",
    )
    with pytest.raises(ConfigError, match="device must be auto, cpu, cuda or cuda:N"):
        load_config(QuantizeConfig, None, ["device=gpu"])
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    plan = plan_quantization(QuantizeConfig(finetuned=tiny_llama, out=str(tmp_path / "p")))
    assert plan.device.type == expected


def test_config_rejects_3_bit_pack_quantized_and_bad_group_size():
    with pytest.raises(ConfigError, match="4-bit only"):
        QuantizeConfig(bits=3, export_format="pack-quantized")
    with pytest.raises(ConfigError, match="group_size"):
        load_config(QuantizeConfig, None, ["group_size=96"])
    assert QuantizeConfig(bits=3).resolved_format == "dequantized"


def test_clipping_runs_by_default_only_before_nearest_rounding():
    assert not QuantizeConfig().resolved_clip  # GPTQ rounding is the default
    assert QuantizeConfig(rounding="nearest").resolved_clip
    assert QuantizeConfig(clip=True).resolved_clip
    assert not load_config(QuantizeConfig, None, ["rounding=nearest", "clip=false"]).resolved_clip


def test_cli_reports_bad_input_without_traceback(tmp_path, tiny_llama, tiny_qwen2, capsys):
    out = tmp_path / "o"
    code = main(["quantize", "--base", tiny_qwen2, "--finetuned", tiny_llama, "--out", str(out)])
    assert code == 2 and not out.exists()
    assert "rlx: error:" in capsys.readouterr().err


def test_cli_quantize_then_eval(tmp_path, tiny_llama, tiny_ft, capsys):
    out = tmp_path / "q4"
    argv = ["quantize", "--base", tiny_llama, "--finetuned", tiny_ft, "--method", "quantlrm"]
    argv += ["--bits", "4", "--group-size", "128", "--calib", "arithmetic", "--out", str(out)]
    argv += ["calib.num_sequences=2", "calib.seq_len=32", "alpha_grid=4"]
    argv += ["calib.options.max_operand=30"]
    argv += ["tune.steps=2", "tune.num_sequences=3", "tune.batch_sequences=2"]
    code = main(argv)
    assert code == 0, capsys.readouterr().err
    printed = capsys.readouterr().out
    assert "wrote" in printed and "tuned scales: calibration KL" in printed
    device = "cuda" if torch.cuda.is_available() else "cpu"  # device=auto
    assert f"quantizing on {device}" in printed
    hint = next(line for line in printed.splitlines() if line.startswith("evaluate it:"))
    assert hint.endswith("--task arithmetic 'task.options.max_operand=30'")  # the calibration task
    meta = json.loads((out / "rlx_quant.json").read_text())
    assert meta["config"]["method"] == "quantlrm" and meta["delta_stats"]["nonzero"] > 0
    assert meta["config"]["calib"]["options"] == {"max_operand": 30}
    assert meta["rounding"] == "gptq" and meta["clip"] is False  # the defaults, as applied
    assert len(meta["tune_kl"]) == 2 and meta["seconds_before_export"]["tune"] > 0
    assert meta["device"] == device and meta["tune"] == {"cuda_graph": False}  # 2 steps: eager
    results = tmp_path / "eval.json"
    argv = ["eval", "--model", tiny_ft, "--model", str(out), "--task", "arithmetic"]
    argv += ["--num-prompts", "4", "max_new_tokens=8", f"output_json={results}"]
    argv += ["task.options.max_operand=30"]
    code = main(argv)
    assert code == 0
    rows = json.loads(results.read_text())
    assert [r["model"] for r in rows] == [tiny_ft, str(out)]
    assert rows[1]["weights"].startswith("int4 g128 pack-quantized")
    assert "reward" in capsys.readouterr().out


def test_checkpoint_without_tokenizer_takes_the_base_tokenizer(tmp_path, tiny_llama, tiny_ft):
    bare = tmp_path / "model"  # like recipes/pg.py's checkpoints/*/model: weights and config only
    AutoModelForCausalLM.from_pretrained(tiny_ft).save_pretrained(bare)
    cfg = QuantizeConfig(finetuned=str(bare), method="rtn", calib=SMALL, out=str(tmp_path / "q"))
    with pytest.raises(QuantError, match="no tokenizer"):
        plan_quantization(cfg)
    cfg = QuantizeConfig(
        base=tiny_llama, finetuned=str(bare), method="rtn", calib=SMALL, out=str(tmp_path / "q")
    )
    result = quantize_model(cfg, show_progress=False)
    assert (result.out / "tokenizer.json").is_file()


def test_pseudo_finetune_moves_every_quantised_matrix(tiny_llama):
    model = AutoModelForCausalLM.from_pretrained(tiny_llama)
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    blocks = calibration_blocks(tokenizer, "arithmetic", 2, 32)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    after = pseudo_finetune(model, blocks, steps=2, lr=1e-3, batch=2)
    assert len(after) == 2 * 7
    assert all(not torch.equal(after[n], before[n]) for n in after)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())  # caller untouched


def test_quantlrm_without_base_uses_pseudo_finetuning(tmp_path, tiny_llama):
    from rlx.quant import quantize_model

    cfg = load_config(
        QuantizeConfig,
        None,
        [
            f"finetuned={tiny_llama}",
            f"out={tmp_path / 'q'}",
            "calib.num_sequences=2",
            "calib.seq_len=32",
            "alpha_grid=4",
            "pseudo_finetune.steps=2",
            "pseudo_finetune.lr=0.001",
        ],
    )
    result = quantize_model(cfg, show_progress=False)
    assert any("pseudo-fine-tune" in n for n in result.report["notes"])
    assert result.report["delta_stats"]["nonzero"] > 0


def test_calibration_blocks_and_arithmetic_completion(tiny_llama, tmp_path):
    assert arithmetic_completion("Sam has 7 apples and buys 5 more.", "12") == (
        "We need 7 + 5, so 7 + 5 = 12.\n<answer>12</answer>"
    )
    assert arithmetic_completion("Mia had 14 pens and lost 6.", "8").startswith("We need 14 - 6")
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    assert calibration_blocks(tokenizer, "arithmetic", 3, 40).shape == (3, 40)
    data = tmp_path / "c.jsonl"
    data.write_text(json.dumps({"prompt": "hi", "completion": "there"}) + "\n")
    with pytest.raises(QuantError, match="tokens"):
        calibration_blocks(tokenizer, str(data), 4, 64)


def test_calibration_too_short_for_tuning_fails_before_any_work(tiny_llama, tmp_path):
    data = tmp_path / "c.jsonl"
    data.write_text(
        "".join(json.dumps({"prompt": f"q{i}", "completion": "a"}) + "\n" for i in range(20))
    )
    calib = CalibrationConfig(source=str(data), num_sequences=1, seq_len=16)
    cfg = QuantizeConfig(
        finetuned=tiny_llama,
        method="rtn",
        calib=calib,
        out=str(tmp_path / "o"),
        tune=TuneConfig(steps=1, num_sequences=400),
    )
    with pytest.raises(QuantError, match=r"400 x 16 .* tune.num_sequences"):
        quantize_model(cfg, show_progress=False)
    assert not (tmp_path / "o").exists()


def test_calibration_options_select_the_task_variant(tiny_llama):
    """calib.options reach the task builder: the blocks hold that variant's questions."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)

    def operands(options):
        blocks = calibration_blocks(tokenizer, "arithmetic", 4, 128, options=options)
        text = tokenizer.decode(blocks.flatten())
        return [int(n) for n in re.findall(r"We need (\d+) [+-] (\d+)", text) for n in n]

    assert max(operands({})) <= 20  # the task's default operand range
    assert max(operands({"max_operand": 99, "ops": ["+"], "one_shot": False})) > 20
    with pytest.raises(QuantError, match="max_operand"):
        calibration_blocks(tokenizer, "arithmetic", 2, 32, options={"max_operand": 0})


def test_shipped_quantize_recipes_load():
    recipes = sorted((REPO / "recipes").glob("quantize*.yaml"))
    assert recipes
    for path in recipes:
        load_config(QuantizeConfig, str(path))
    load_config(EvalCommandConfig, None, ["models=[a, b]", "task.num_prompts=10"])
