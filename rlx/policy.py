"""The trainer side of a policy: loading (full or LoRA), batching rollouts, logprobs, weight export.

Batch layout for a forward pass over B = P*G sequences: prompts left-padded to a common width,
completions right-padded to T tokens, so every completion starts at the same column and the
logits for all completion tokens are the last T+1 positions (`logits_to_keep`).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from rlx.models import load_model_and_tokenizer
from rlx.rollout import Completion


def load_policy(model_cfg, lora_cfg):
    """The trainable policy (fp32 master weights) and its tokenizer; LoRA-wrapped when enabled."""
    model, tokenizer = load_model_and_tokenizer(model_cfg.name, dtype=model_cfg.dtype)
    model.config.use_cache = False
    if lora_cfg.enabled:
        from peft import LoraConfig, get_peft_model

        peft_cfg = LoraConfig(
            r=lora_cfg.rank,
            lora_alpha=lora_cfg.alpha,
            target_modules=list(lora_cfg.target_modules),
            lora_dropout=0.0,
            task_type="CAUSAL_LM",
        )
        model = get_peft_model(model, peft_cfg)
    model.train()
    return model, tokenizer


def export_weights(model) -> Iterator[tuple[str, torch.Tensor]]:
    """HF-named weights for the rollout engine. A peft model is merged, copied out, and unmerged:
    the copy matters because callers may hold the tensors past the unmerge."""
    if not hasattr(model, "peft_config"):
        yield from model.state_dict().items()
        return
    model.merge_adapter()
    try:
        merged = [
            (name.replace(".base_layer.", "."), tensor.detach().clone())
            for name, tensor in model.get_base_model().state_dict().items()
            if "lora_" not in name
        ]
    finally:
        model.unmerge_adapter()
    yield from merged


@dataclass
class SequenceBatch:
    """Tensors for one forward pass over prompt + completion sequences."""

    input_ids: torch.Tensor  # [B, W+T] left-padded prompts, then right-padded completions
    attention_mask: torch.Tensor  # [B, W+T]
    position_ids: torch.Tensor  # [B, W+T] 0 at each sequence's first real token
    completion_ids: torch.Tensor  # [B, T]
    completion_mask: torch.Tensor  # [B, T] float, 1 on real completion tokens
    sampler_logprobs: torch.Tensor  # [B, T] the rollout engine's logprobs (0 on padding)

    def to(self, device) -> SequenceBatch:
        return SequenceBatch(*(t.to(device) for t in vars(self).values()))

    def __getitem__(self, rows) -> SequenceBatch:
        return SequenceBatch(*(t[rows] for t in vars(self).values()))


def build_batch(completions: list[Completion], pad_id: int) -> SequenceBatch:
    """Stack completions (with their prompts) into a SequenceBatch."""
    width = max(len(c.prompt_token_ids) for c in completions)
    t_max = max(max(len(c.token_ids) for c in completions), 1)
    b = len(completions)
    ids = torch.full((b, width + t_max), pad_id, dtype=torch.long)
    attn = torch.zeros((b, width + t_max), dtype=torch.long)
    comp_mask = torch.zeros((b, t_max))
    sampler = torch.zeros((b, t_max))
    for row, c in enumerate(completions):
        p, t = len(c.prompt_token_ids), len(c.token_ids)
        ids[row, width - p : width] = torch.tensor(c.prompt_token_ids)
        ids[row, width : width + t] = torch.tensor(c.token_ids, dtype=torch.long)
        attn[row, width - p : width + t] = 1
        comp_mask[row, :t] = 1
        sampler[row, :t] = torch.tensor(c.logprobs)
    positions = (attn.cumsum(-1) - 1).clamp(min=0)
    return SequenceBatch(ids, attn, positions, ids[:, width:], comp_mask, sampler)


def completion_logits(model, batch: SequenceBatch) -> torch.Tensor:
    """Logits predicting each completion token. -> [B, T, V]."""
    t = batch.completion_ids.shape[1]
    out = model(
        input_ids=batch.input_ids,
        attention_mask=batch.attention_mask,
        position_ids=batch.position_ids,
        logits_to_keep=t + 1,
        use_cache=False,
    )
    logits = out.logits[:, :-1]  # position j predicts completion token j
    if logits.shape[1] != t:  # a wrapper that ignores logits_to_keep would misalign every token
        raise RuntimeError(
            f"model returned {logits.shape[1] + 1} logit positions, expected {t + 1}"
        )
    return logits
