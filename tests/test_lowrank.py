"""The one low-rank update type (rlx/lowrank.py): its merge is scale * U V^T, its PEFT
adapter folders load in PEFT itself with the same delta, a PEFT LoRA model reads back into it, and
EGGROLL's noise expressed in it is bit for bit the noise of before the type existed."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from rlx.algos import eggroll as eg
from rlx.lowrank import (
    LowRank,
    from_peft_model,
    load_peft_adapter,
    merge_,
    merged,
    save_peft_adapter,
    stack,
)

GEN = torch.Generator().manual_seed(0)


def random_update(d_out: int, d_in: int, rank: int, scale: float = 1.0) -> LowRank:
    return LowRank(
        torch.randn(d_out, rank, generator=GEN), torch.randn(d_in, rank, generator=GEN), scale
    )


def test_delta_and_merge_are_scale_times_u_vt():
    d = random_update(6, 5, 3, scale=0.25)
    expected = 0.25 * (d.u @ d.v.T)  # PEFT's B @ A * scale with B = u, A = v^T
    torch.testing.assert_close(d.delta(), expected, rtol=1e-6, atol=1e-7)
    assert d.shape == (6, 5) and d.rank == 3
    w = torch.randn(6, 5, generator=GEN)
    torch.testing.assert_close(merged(w, d), w + expected, rtol=1e-6, atol=1e-7)
    w_copy = w.clone()
    assert merge_(w_copy, d) is w_copy
    assert torch.equal(w_copy, merged(w, d))
    one = random_update(6, 5, 2)
    assert torch.equal(one.delta(), one.u @ one.v.T)  # scale 1: no multiply at all
    assert torch.equal(merged(w.double(), one), w.double() + (one.u @ one.v.T).double())
    with pytest.raises(ValueError, match="rank"):
        LowRank(torch.zeros(6, 2), torch.zeros(5, 3))


def test_stack_members_and_weighted_sum():
    parts = [random_update(4, 7, 2, scale=0.5) for _ in range(3)]
    s = stack(parts)
    assert s.shape == (3, 4, 7) and s.u.shape == (3, 4, 2)
    for i, p in enumerate(parts):
        assert torch.equal(s.member(i).delta(), p.delta())
        assert torch.equal(s.delta()[i], p.delta())
    weights = torch.tensor([1.5, -2.0, 0.25], dtype=torch.float64)
    explicit = sum(float(w) * p.delta().double() for w, p in zip(weights, parts, strict=True))
    torch.testing.assert_close(s.weighted_sum(weights), explicit, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="different scales"):
        stack([random_update(4, 7, 2, 1.0), random_update(4, 7, 2, 2.0)])


def test_peft_folder_loads_in_peft_with_the_same_delta(tiny_llama, tmp_path):
    """factors -> save_peft_adapter -> PEFT's PeftModel.from_pretrained: every layer's delta (and
    merge_and_unload) is our delta; load_peft_adapter reads the folder back to the same delta."""
    from peft import PeftModel

    base = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    shapes = {
        n: tuple(m.weight.shape)
        for n, m in base.named_modules()
        if n.endswith(("q_proj", "down_proj"))
    }
    updates = {n: random_update(*shape, rank=4, scale=0.3) for n, shape in shapes.items()}
    assert len(updates) == 4  # every module PEFT's target_modules names: no key missing
    save_peft_adapter(tmp_path / "a", updates, tiny_llama)
    w0 = {n: p.detach().clone() for n, p in base.named_parameters()}
    peft_model = PeftModel.from_pretrained(base, str(tmp_path / "a"))
    layers = dict(peft_model.get_base_model().named_modules())
    for name, update in updates.items():
        torch.testing.assert_close(
            layers[name].get_delta_weight("default"), update.delta(), rtol=1e-5, atol=1e-6
        )
    merged_sd = peft_model.merge_and_unload().state_dict()
    for name, update in updates.items():
        key = f"{name}.weight"
        torch.testing.assert_close(merged_sd[key], merged(w0[key], update), rtol=1e-5, atol=1e-6)
    untouched = "model.layers.0.self_attn.k_proj.weight"
    assert torch.equal(merged_sd[untouched], w0[untouched])
    back = load_peft_adapter(tmp_path / "a")
    assert back.keys() == updates.keys()
    for name, update in updates.items():
        torch.testing.assert_close(back[name].delta(), update.delta(), rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError, match="one rank"):
        save_peft_adapter(
            tmp_path / "b", {"x": random_update(3, 3, 1), "y": random_update(3, 3, 2)}, "m"
        )


@pytest.mark.parametrize("rslora", [False, True])
def test_a_peft_lora_model_reads_back_as_updates(tiny_llama, rslora, tmp_path):
    """from_peft_model: base weight merged with each update = PEFT's merge_and_unload; the folder
    PEFT's save_pretrained writes reads back (load_peft_adapter) to the same updates."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    cfg = LoraConfig(
        r=4,
        lora_alpha=6,
        target_modules=["q_proj", "up_proj"],
        init_lora_weights=False,
        use_rslora=rslora,
    )
    model = get_peft_model(base, cfg)
    updates = from_peft_model(model)
    assert len(updates) == 4 and all(u.rank == 4 for u in updates.values())
    assert all(u.scale == pytest.approx(6 / (2 if rslora else 4)) for u in updates.values())
    model.save_pretrained(tmp_path)
    loaded = load_peft_adapter(tmp_path)
    assert loaded.keys() == updates.keys()
    for name, update in updates.items():
        assert loaded[name].scale == update.scale
        torch.testing.assert_close(loaded[name].delta(), update.delta().detach())
    layers = dict(model.get_base_model().named_modules())
    expected = {
        f"{n}.weight": merged(layers[n].get_base_layer().weight.detach(), u)
        for n, u in updates.items()
    }
    merged_sd = model.merge_and_unload().state_dict()
    for key, weight in expected.items():
        torch.testing.assert_close(merged_sd[key], weight.detach(), rtol=1e-5, atol=1e-6)


def test_dora_is_refused(tiny_llama):
    from peft import LoraConfig, get_peft_model

    base = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    model = get_peft_model(base, LoraConfig(r=2, target_modules=["q_proj"], use_dora=True))
    with pytest.raises(ValueError, match="DoRA"):
        from_peft_model(model)


# ----------------------------------------------------------------------------- EGGROLL's noise

# Digests of EGGROLL's noise, update and vllm_lora adapter files as computed before the type
# existed (commit 1b16afe: low_rank_factors / population_factors / write_adapter).
PRE_TYPE_DIGESTS = {
    "member": "ddee1ce1fa10cfbf",
    "population": "783f54cfdcbd40d3",
    "step": "3a454f492ef76aa3",
    "perturbation": "d9cfb632f85978be",
    "adapter": "5ca6f97d96e8cacb",
}
SPEC = eg.NoiseSpec(seed=7, sigma=0.02, rank=3, noise_reuse=2)


def digest(*tensors: torch.Tensor) -> str:
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def test_es_noise_in_the_type_equals_the_old_noise_bit_for_bit(tmp_path):
    member = eg.low_rank_noise(SPEC, "model.layers.1.mlp.up_proj.weight", (24, 16), 5, 3)
    pop = eg.population_noise(
        SPEC, "model.layers.0.self_attn.q_proj.weight", (16, 16), 1, [0, 1, 4, 5]
    )
    f = torch.tensor([0.5, -1.0, 2.0, 0.25, -0.3, 0.0], dtype=torch.float64)
    got = {
        "member": digest(member.u, member.v),
        "population": digest(pop.u, pop.v),
        "step": digest(eg.step_direction(SPEC, "w", (12, 10), 3, f)),
        "perturbation": digest(eg.perturbation(SPEC, "w", (12, 10), 3, 1)),
    }
    # what the vllm_lora backend writes for member 5 at epoch 2
    shapes = {"model.layers.0.self_attn.q_proj.weight": (16, 16)}
    shapes["model.layers.0.mlp.down_proj.weight"] = (16, 40)
    save_peft_adapter(tmp_path, eg.noise_adapter(SPEC, shapes, 2, 5), "rlx-es")
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    got["adapter"] = digest(*[tensors[k] for k in sorted(tensors)])
    assert got == PRE_TYPE_DIGESTS
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["target_modules"]) == (
        3,
        3,
        ["down_proj", "q_proj"],
    )
    # the member's adapter is its dense perturbation, and W + E is the type's merge
    e = eg.perturbation(SPEC, "model.layers.1.mlp.up_proj.weight", (24, 16), 5, 3)
    assert torch.equal(member.delta(), e)
    w = torch.randn(24, 16, generator=GEN)
    assert torch.equal(
        eg.perturbed_weight(SPEC, "model.layers.1.mlp.up_proj.weight", w, 5, 3), w + e
    )
