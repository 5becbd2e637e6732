"""The trainer side of a policy: loading (full or adapted), batching rollouts, logprobs, weight export.

Batch layout for a forward pass over B = P*G sequences: prompts left-padded to a common width,
completions right-padded to T tokens, so every completion starts at the same column and the
logits for all completion tokens are the last T+1 positions (`logits_to_keep`).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from rlx.adapters import build_adapter, merged_weights
from rlx.models import load_model_and_tokenizer
from rlx.rollout import Completion
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


@dataclass
class RolloutBatch:
    """P prompts with G completions each, as tensors for the trainer's forward pass."""

    prompt_ids: torch.Tensor  # [P, W] left-padded
    prompt_mask: torch.Tensor  # [P, W]
    completion_ids: torch.Tensor  # [P*G, T] right-padded, prompt-major
    completion_mask: torch.Tensor  # [P*G, T] float, 1 on real completion tokens
    sampler_logprobs: torch.Tensor  # [P*G, T] the rollout engine's logprobs (0 on padding)
    group_size: int

    @property
    def num_groups(self) -> int:
        return self.prompt_ids.shape[0]

    def groups(self, start: int, stop: int) -> RolloutBatch:
        """Groups start..stop-1 (with all their completions)."""
        g = self.group_size
        rows = slice(start * g, stop * g)
        return RolloutBatch(
            self.prompt_ids[start:stop],
            self.prompt_mask[start:stop],
            self.completion_ids[rows],
            self.completion_mask[rows],
            self.sampler_logprobs[rows],
            g,
        )

    def to(self, device) -> RolloutBatch:
        tensors = (
            self.prompt_ids,
            self.prompt_mask,
            self.completion_ids,
            self.completion_mask,
            self.sampler_logprobs,
        )
        return RolloutBatch(*(t.to(device) for t in tensors), self.group_size)


@dataclass
class MiniBatch:
    """One rank's share of one optimizer step: its groups, each sequence's advantage and loss
    weight (1, or 0 for a stand-in group or a masked truncated completion), the old logprobs."""

    batch: RolloutBatch
    advantages: torch.Tensor  # [B]
    weights: torch.Tensor  # [B]
    old_logprobs: torch.Tensor | None = None  # [B, T]; None: the current policy's (one update)


def build_batch(completions: list[Completion], pad_id: int, group_size: int) -> RolloutBatch:
    """Stack prompt-major groups of `group_size` completions into a RolloutBatch."""
    groups = [completions[i : i + group_size] for i in range(0, len(completions), group_size)]
    if any(
        len(gr) != group_size or any(c.prompt_index != gr[0].prompt_index for c in gr)
        for gr in groups
    ):
        raise ValueError(f"completions must come in prompt-major groups of {group_size}")
    width = max(len(gr[0].prompt_token_ids) for gr in groups)
    t_max = max(max(len(c.token_ids) for c in completions), 1)
    prompt_ids = torch.full((len(groups), width), pad_id, dtype=torch.long)
    prompt_mask = torch.zeros((len(groups), width), dtype=torch.long)
    for row, gr in enumerate(groups):
        ids = gr[0].prompt_token_ids
        prompt_ids[row, width - len(ids) :] = torch.tensor(ids)
        prompt_mask[row, width - len(ids) :] = 1
    comp_ids = torch.full((len(completions), t_max), pad_id, dtype=torch.long)
    comp_mask = torch.zeros((len(completions), t_max))
    sampler = torch.zeros((len(completions), t_max))
    for row, c in enumerate(completions):
        t = len(c.token_ids)
        comp_ids[row, :t] = torch.tensor(c.token_ids, dtype=torch.long)
        comp_mask[row, :t] = 1
        sampler[row, :t] = torch.tensor(c.logprobs)
    return RolloutBatch(prompt_ids, prompt_mask, comp_ids, comp_mask, sampler, group_size)


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
