"""The trainer's batch types: a step's completions as padded tensors, and one optimizer step's share.

Layout for a forward pass over B = P*G sequences: prompts left-padded to a common width,
completions right-padded to T tokens, so every completion starts at the same column.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rlx.rollout import Completion


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
