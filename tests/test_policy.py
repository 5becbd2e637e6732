"""Trainer-side batching: the shared-prompt forward equals one forward per sequence."""

from __future__ import annotations

import pytest
import torch

from rlx.batch import build_batch
from rlx.config import AdapterConfig, ModelConfig
from rlx.policy import completion_logits, completion_logits_reference, load_policy
from rlx.rollout import Completion


def _completions(prompts: list[list[int]], lengths: list[list[int]]) -> list[Completion]:
    gen = torch.Generator().manual_seed(0)
    out = []
    for p, (prompt, group) in enumerate(zip(prompts, lengths, strict=True)):
        for t in group:
            ids = torch.randint(3, 400, (t,), generator=gen).tolist()
            out.append(Completion(p, prompt, ids, [-1.0] * t, "", "stop"))
    return out


@pytest.mark.parametrize("method", ["none", "lora"])
def test_shared_prompt_forward_matches_reference(tiny_qwen2, method):
    model, _ = load_policy(ModelConfig(name=tiny_qwen2), AdapterConfig(method=method, rank=4))
    prompts = [[5, 6, 7, 8, 9], [11, 12], [20, 21, 22, 23]]  # different lengths: left padding
    comps = _completions(prompts, [[4, 1, 3], [2, 4, 4], [1, 1, 2]])
    batch = build_batch(comps, pad_id=0, group_size=3)
    assert batch.prompt_ids.shape == (3, 5) and batch.completion_ids.shape == (9, 4)
    fast = completion_logits(model, batch)
    ref = completion_logits_reference(model, batch)
    mask = batch.completion_mask.bool()
    assert torch.allclose(fast[mask], ref[mask], atol=1e-5)
    # gradients agree too (the prompt's KV cache is shared by its completions)
    params = [p for p in model.parameters() if p.requires_grad]
    g_fast = torch.autograd.grad(fast[mask].logsumexp(-1).sum(), params)
    g_ref = torch.autograd.grad(ref[mask].logsumexp(-1).sum(), params)
    for a, b in zip(g_fast, g_ref, strict=True):
        assert torch.allclose(a, b, atol=1e-4)


def test_groups_slice_and_bad_grouping():
    comps = _completions([[1, 2], [3]], [[2, 2], [1, 3]])
    batch = build_batch(comps, pad_id=0, group_size=2)
    sub = batch.groups(1, 2)
    assert sub.num_groups == 1 and sub.completion_ids.shape[0] == 2
    assert sub.completion_mask.sum() == 4
    with pytest.raises(ValueError, match="groups of 3"):
        build_batch(comps, pad_id=0, group_size=3)
