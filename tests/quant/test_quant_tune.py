"""rlx.quant.tune: tuning the stored scales and norm weights lowers the KL to the teacher and
changes nothing but those numbers; the model and the stored weights agree afterwards."""

from __future__ import annotations

import copy

import pytest
import torch
from torch.nn.utils import parametrize
from transformers import AutoModelForCausalLM

from rlx.config import ConfigError
from rlx.models.tiny import tiny_config
from rlx.quant import QuantizedWeight, TuneConfig, quantize_weight
from rlx.quant.tune import is_norm_weight, token_kl, tune_scales

BLOCKS = torch.randint(3, 500, (8, 32), generator=torch.Generator().manual_seed(0))


def quantised_pair(seed: int = 0):
    """A tiny Llama (teacher) and its RTN W4 g64 fake-quantised copy with the stored weights."""
    torch.manual_seed(seed)
    config = tiny_config("llama", vocab_size=512, tie_embeddings=True)
    config.initializer_range = 0.1  # large weights: 4-bit error visible in the logits
    teacher = AutoModelForCausalLM.from_config(config).eval()
    model = copy.deepcopy(teacher)
    quantized = {}
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("proj.weight"):
                quantized[name] = quantize_weight(p, 4, 64, torch.bfloat16)
                p.copy_(quantized[name].dequantize())
            else:
                p.copy_(p.to(torch.bfloat16).float())
    return teacher, model, quantized


def kl(teacher, model) -> float:
    with torch.no_grad():
        return token_kl(teacher(BLOCKS).logits, model(BLOCKS).logits).item()


def test_tuning_lowers_kl_and_changes_only_scales_and_norms():
    teacher, model, quantized = quantised_pair()
    before = {n: (q.codes.clone(), q.zero.clone(), q.scale.clone()) for n, q in quantized.items()}
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    kl_before = kl(teacher, model)
    losses = tune_scales(
        model,
        teacher,
        quantized,
        BLOCKS,
        steps=40,
        lr=1e-2,
        batch=4,
        dtype=torch.bfloat16,
        show_progress=False,
    )
    assert len(losses) == 40
    assert kl(teacher, model) < 0.7 * kl_before
    for name, q in quantized.items():
        codes, zero, scale = before[name]
        assert torch.equal(q.codes, codes) and torch.equal(q.zero, zero)
        assert q.scale.dtype == torch.bfloat16 and not torch.equal(q.scale, scale)
    for name, p in model.named_parameters():
        assert not p.requires_grad
        if name in quantized:  # the model decodes exactly what is stored
            assert torch.equal(p, quantized[name].dequantize())
        elif is_norm_weight(name):  # tuned, and representable in the export dtype
            assert not torch.equal(p, params[name])
            assert torch.equal(p, p.to(torch.bfloat16).float())
        else:  # embeddings are not tuned
            assert torch.equal(p, params[name])
    assert not any(parametrize.is_parametrized(m) for m in model.modules())


def test_interrupted_tuning_leaves_model_and_stored_weights_in_agreement():
    teacher, model, quantized = quantised_pair(seed=1)
    calls = 0
    forward = teacher.forward

    def failing_forward(*args, **kwargs):
        nonlocal calls
        calls += 1
        if calls == 3:
            raise KeyboardInterrupt
        return forward(*args, **kwargs)

    teacher.forward = failing_forward
    with pytest.raises(KeyboardInterrupt):
        tune_scales(
            model,
            teacher,
            quantized,
            BLOCKS,
            steps=10,
            lr=1e-2,
            batch=4,
            dtype=torch.bfloat16,
            show_progress=False,
        )
    assert not any(parametrize.is_parametrized(m) for m in model.modules())
    for name, q in quantized.items():
        assert torch.equal(model.get_parameter(name), q.dequantize())


@pytest.mark.parametrize(
    "field, value", [("steps", -1), ("lr", 0.0), ("num_sequences", 0), ("batch_sequences", 0)]
)
def test_tune_config_rejects_bad_values(field, value):
    with pytest.raises(ConfigError, match=field):
        TuneConfig(**{field: value})


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_graph_steps_match_eager_steps():
    """Replaying the step from a CUDA graph computes what the eager steps compute; batches of
    unequal size stay eager."""
    runs = {}
    for graph in (False, True):
        teacher, model, quantized = quantised_pair(seed=2)
        teacher, model = teacher.cuda(), model.cuda()
        quantized = {
            n: QuantizedWeight(q.codes.cuda(), q.scale.cuda(), q.zero.cuda(), q.bits, q.group_size)
            for n, q in quantized.items()
        }
        report = {}
        losses = tune_scales(
            model,
            teacher,
            quantized,
            BLOCKS.cuda(),
            steps=12,
            lr=1e-2,
            batch=4,
            dtype=torch.bfloat16,
            show_progress=False,
            cuda_graph=graph,
            report=report,
        )
        assert report == {"cuda_graph": graph}
        runs[graph] = losses, {n: q.scale.float() for n, q in quantized.items()}
    (eager, eager_scales), (graphed, graphed_scales) = runs[False], runs[True]
    assert len(graphed) == 12 and graphed[-1] < graphed[0]
    assert torch.allclose(torch.tensor(graphed), torch.tensor(eager), rtol=1e-2)  # bf16, atomics
    for name, scale in eager_scales.items():
        assert torch.allclose(graphed_scales[name], scale, rtol=1e-2), name
    teacher, model, quantized = quantised_pair(seed=2)
    report = {}
    tune_scales(
        model.cuda(),
        teacher.cuda(),
        {},
        BLOCKS[:7].cuda(),
        steps=5,
        lr=1e-2,
        batch=4,
        dtype=torch.bfloat16,
        show_progress=False,
        report=report,
    )
    assert report == {"cuda_graph": False}
