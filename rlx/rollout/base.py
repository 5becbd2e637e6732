"""The rollout engine interface shared by the vLLM backend and the HF `generate` fallback.

An engine turns prompts (text, or chat messages rendered with the tokenizer's chat template) into
`n` completions each, with token ids and the sampler's per-token logprobs, and takes new weights
from the trainer with `update_weights`. Both backends tokenize prompts with `encode_prompts`, so
they see exactly the same token ids.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch

Prompt = str | list[dict]


@dataclass
class Sampling:
    """How to sample: the subset of sampling parameters both backends implement identically."""

    n: int = 1
    max_new_tokens: int = 64
    temperature: float = 1.0  # 0 means greedy
    top_p: float = 1.0
    top_k: int = -1  # -1 means off
    stop: list[str] = field(default_factory=list)  # stop strings, kept in the output text

    @classmethod
    def from_config(cls, cfg, **overrides) -> Sampling:
        """Build from an rlx.config.RolloutConfig, with optional field overrides."""
        values = dict(
            n=cfg.num_samples,
            max_new_tokens=cfg.max_new_tokens,
            temperature=cfg.temperature,
            top_p=cfg.top_p,
            top_k=cfg.top_k,
            stop=list(cfg.stop),
        )
        values.update(overrides)
        return cls(**values)


@dataclass
class Completion:
    """One sampled completion of one prompt."""

    prompt_index: int  # position of its prompt in the generate() call
    prompt_token_ids: list[int]
    token_ids: list[int]  # generated tokens, including the final eos/stop token if produced
    logprobs: list[float]  # the sampler's logprob of each generated token (after temperature)
    text: str
    finish_reason: str  # "stop" (eos or stop string) or "length"


class RolloutEngine(Protocol):
    """What a learner needs from a generator."""

    tokenizer: object

    def generate(self, prompts: Sequence[Prompt], sampling: Sampling) -> list[Completion]:
        """`sampling.n` completions per prompt, prompt-major: [p0s0, p0s1, ..., p1s0, ...]."""
        ...

    def prompt_logprobs(self, token_ids: Sequence[Sequence[int]]) -> list[list[float]]:
        """log p(token_t | tokens_<t) for t >= 1 of each sequence, under the engine's weights."""
        ...

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Load new weights (HF checkpoint names) into the engine; later calls use them."""
        ...

    def close(self) -> None: ...


def encode_prompts(tokenizer, prompts: Sequence[Prompt]) -> list[list[int]]:
    """Token ids of each prompt: chat messages go through the chat template, text is tokenized."""
    encoded = []
    for i, prompt in enumerate(prompts):
        if isinstance(prompt, str):
            encoded.append(tokenizer(prompt, add_special_tokens=False)["input_ids"])
        elif isinstance(prompt, list) and all(isinstance(m, dict) for m in prompt):
            ids = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True)
            if isinstance(ids, dict) or hasattr(ids, "input_ids"):
                ids = ids["input_ids"]
            encoded.append(list(ids))
        else:
            raise TypeError(
                f"prompt {i} is a {type(prompt).__name__}: pass a string or a list of "
                '{"role": ..., "content": ...} chat messages'
            )
    return encoded


def check_sampling(sampling: Sampling) -> None:
    """Reject sampling settings that would silently misbehave."""
    if sampling.n < 1 or sampling.max_new_tokens < 1:
        raise ValueError(f"n and max_new_tokens must be >= 1, got {sampling}")
    if sampling.temperature == 0 and sampling.n > 1:
        raise ValueError(
            f"greedy decoding (temperature 0) with n={sampling.n} gives n identical completions: "
            "use n=1 or a temperature above 0"
        )
