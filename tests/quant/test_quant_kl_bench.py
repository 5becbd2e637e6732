"""bench/quant_kl.py's teacher forcing: the shared-prefix KV cache gives the same log-probabilities
as running every sequence whole, and a model compared with itself has zero KL."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch


def load_bench():
    path = Path(__file__).parents[2] / "bench" / "quant_kl.py"
    spec = importlib.util.spec_from_file_location("quant_kl_bench", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_shared_prefix_keeps_one_token_in_every_suffix():
    bench = load_bench()
    assert bench.shared_prefix([[1, 2, 3, 4], [1, 2, 3, 5], [1, 2, 9]]) == [1]
    assert bench.shared_prefix([[1, 2, 3], [1, 2, 3]]) == [1, 2]
    assert bench.shared_prefix([[1, 2], [3]]) == []


def test_prefix_cache_matches_whole_sequences(tiny_llama):
    from transformers import AutoModelForCausalLM

    bench = load_bench()
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
    prompts = [[5, 6, 7, 8, 9], [5, 6, 7, 10], [5, 6, 7, 11, 12, 13]]
    completions = [[20, 21], [22, 23, 24], [25]]
    forced = bench.TeacherForced(prompts, completions, pad_id=0, batch_size=2)  # 2 batches
    assert forced.prefix == [5, 6]
    got = torch.cat(forced.logprobs(model))
    expected = []
    with torch.no_grad():
        for prompt, completion in zip(prompts, completions, strict=True):
            logits = model(input_ids=torch.tensor([prompt + completion])).logits[0]
            rows = slice(len(prompt) - 1, len(prompt) + len(completion) - 1)
            expected.append(torch.log_softmax(logits[rows].float(), -1))
    torch.testing.assert_close(got, torch.cat(expected), atol=1e-4, rtol=1e-4)
    same = forced.compare(forced.logprobs(model), model)
    assert same["kl"] == pytest.approx(0.0, abs=1e-6)
    assert same["agree"] == 1.0 and same["same_greedy"] == 1.0


def test_reference_rows_perturb_what_they_say(tiny_llama, tmp_path):
    from transformers import AutoModelForCausalLM

    from rlx.quant import QuantizeConfig, plan_quantization

    bench = load_bench()
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
    sizes = plan_quantization(QuantizeConfig(finetuned=tiny_llama, out=str(tmp_path / "q")))
    original = dict(model.named_parameters())
    bf16 = dict(bench.perturbed(model, sizes.group_sizes, None).named_parameters())
    assert all(torch.equal(bf16[n], p.to(torch.bfloat16).float()) for n, p in original.items())
    errors = {}
    for bits in (8, 5):
        params = dict(bench.perturbed(model, sizes.group_sizes, bits).named_parameters())
        for name, p in original.items():
            if name.endswith("proj.weight"):
                assert not torch.equal(params[name], p)
            else:  # embeddings and norms keep full precision
                assert torch.equal(params[name], p)
        down = "model.layers.0.mlp.down_proj.weight"
        errors[bits] = (params[down] - original[down]).abs().max()
    assert errors[8] < errors[5] / 4
