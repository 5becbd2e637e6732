"""The trainer side of a policy: loading (full or adapted), logprobs of a batch, weight export.

The forward pass runs over a rlx.batch.RolloutBatch: every completion starts at the same column,
so the logits of all completion tokens are the last T+1 positions (`logits_to_keep`).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from rlx.adapters import build_adapter, merged_weights
from rlx.batch import RolloutBatch
from rlx.models import load_model_and_tokenizer
from rlx.sharding import full_numel


def load_policy(model_cfg, adapter_cfg, total_steps: int | None = None):
    """The trainable policy (fp32 master weights) and its tokenizer, wrapped in the adapter of
    `adapter_cfg` (an AdapterConfig) when it has one (rlx.adapters.build_adapter; `total_steps`:
    the run's optimizer steps, for AdaLoRA)."""
    model, tokenizer = load_model_and_tokenizer(model_cfg.name, dtype=model_cfg.dtype)
    model.config.use_cache = False
    model = build_adapter(model, adapter_cfg, total_steps)
    model.train()
    return model, tokenizer


def export_weights(model) -> Iterator[tuple[str, torch.Tensor]]:
    """HF-named weights for the rollout engine. A peft model's are merged copies
    (rlx.adapters.merged_weights: the base weights are restored exactly afterwards)."""
    if not hasattr(model, "peft_config"):
        yield from model.state_dict().items()
        return
    yield from merged_weights(model)


def matmul_params(model: torch.nn.Module) -> int:
    """Weights of the model's matrix multiplications (every nn.Linear, the LM head included; the
    embedding lookup is free): a forward pass costs about 2 FLOPs per weight per token."""
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    return sum(full_numel(m.weight) for m in linears)  # ZeRO-3 keeps a slice of each weight here


def completion_logits(model, batch: RolloutBatch) -> torch.Tensor:
    """Logits predicting each completion token, [P*G, T, V], running each prompt once.

    The prompt's forward pass (with gradients) builds a KV cache that is repeated for its G
    completions, so the G copies of the prompt are not recomputed; gradients flow back through
    the repeat. Equal to `completion_logits_reference` (tests/test_policy.py).
    """
    g, t = batch.group_size, batch.completion_ids.shape[1]
    prompt_pos = (batch.prompt_mask.cumsum(-1) - 1).clamp(min=0)  # [P, W]
    prompt_out = model(
        input_ids=batch.prompt_ids,
        attention_mask=batch.prompt_mask,
        position_ids=prompt_pos,
        use_cache=True,
        logits_to_keep=1,
    )
    first = prompt_out.logits[:, -1:].repeat_interleave(g, dim=0)  # [B, 1, V] predicts token 0
    cache = prompt_out.past_key_values
    cache.batch_repeat_interleave(g)
    mask = torch.cat(
        [batch.prompt_mask.repeat_interleave(g, dim=0), batch.completion_mask.long()], dim=1
    )
    start = batch.prompt_mask.sum(-1).repeat_interleave(g)  # [B] real prompt lengths
    positions = start[:, None] + torch.arange(t, device=start.device)  # [B, T]
    out = model(
        input_ids=batch.completion_ids,
        attention_mask=mask,
        position_ids=positions,
        past_key_values=cache,
        use_cache=True,
    )
    logits = torch.cat([first, out.logits[:, :-1]], dim=1)  # [B, T, V]
    if logits.shape[1] != t:
        raise RuntimeError(f"got {logits.shape[1]} logit positions, expected {t}")
    return logits


def completion_logits_reference(model, batch: RolloutBatch) -> torch.Tensor:
    """Plain reference for completion_logits: one forward per prompt+completion sequence."""
    g, rows = batch.group_size, []
    for i in range(batch.completion_ids.shape[0]):
        prompt = batch.prompt_ids[i // g][batch.prompt_mask[i // g] > 0]
        ids = torch.cat([prompt, batch.completion_ids[i]])[None]
        logits = model(input_ids=ids, use_cache=False).logits[0]
        rows.append(logits[len(prompt) - 1 : -1])  # [T, V]
    return torch.stack(rows)
