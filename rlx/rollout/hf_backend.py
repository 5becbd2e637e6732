"""Rollouts with HF `generate`: the fallback when vLLM is not available, behind the same interface.

It keeps its own copy of the model, so `update_weights` is a plain `load_state_dict`. Slower than
vLLM (about 10x on CPU, see bench/rollout.py) but needs nothing beyond transformers. The copy lives
on the GPU when there is one (`device=None`), else on the CPU. `HFEngine.from_model` wraps a model
that is already loaded (the ES hf_batched backend generates with it under the population forward).
In-place perturbation is a weight copy; per-prompt LoRA adapters are not supported.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Sequence

import torch

from rlx.models import load_model_and_tokenizer
from rlx.rollout.base import (
    Adapter,
    Completion,
    LoRALimits,
    Prompt,
    Sampling,
    check_sampling,
    encode_prompts,
    unsupported,
)
from rlx.sharding import whole_model_loading

NO_ADAPTERS = "use rollout.backend=vllm (with rollout.enable_lora=true), or es.evaluator=hf_batched"


class HFEngine:
    """The rlx rollout engine on HF transformers `generate` (left-padded batches)."""

    def __init__(
        self,
        model: str,
        *,
        dtype: str = "float32",
        seed: int = 0,
        batch_size: int = 64,
        device: str | None = None,
    ):
        with whole_model_loading():  # a copy of its own, whole on every rank under ZeRO-3 too
            self.model, self.tokenizer = load_model_and_tokenizer(model, dtype=dtype)
        self.synced_gpus = False  # a whole copy: no rank waits for the others' forward passes
        self.weight_version = 0  # the version of the last whole weight update (0: as loaded)
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model.to(self.device)
        self.batch_size = batch_size  # sequences per generate() call (0: all in one call)
        torch.manual_seed(seed)
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.pad_id = self.tokenizer.pad_token_id

    @classmethod
    def from_model(cls, model, tokenizer, batch_size: int = 0) -> HFEngine:
        """Wrap a loaded model where it is; neither it, its tokenizer nor the RNG is touched."""
        engine = cls.__new__(cls)
        engine.model, engine.tokenizer, engine.batch_size = model, tokenizer, batch_size
        engine.device, engine.weight_version = model.device, 0
        engine.synced_gpus = None  # transformers decides (a model sharded under ZeRO-3: True)
        pad = tokenizer.pad_token_id
        engine.pad_id = pad if pad is not None else tokenizer.eos_token_id
        return engine

    @classmethod
    def from_config(cls, model: str, cfg) -> HFEngine:
        """Build from a model name and an rlx.config.RolloutConfig."""
        dtype = "float32" if cfg.dtype == "auto" else cfg.dtype
        return cls(model, dtype=dtype, seed=cfg.seed)

    def _pad_left(self, sequences: Sequence[Sequence[int]]):
        width = max(len(s) for s in sequences)
        ids = torch.full((len(sequences), width), self.pad_id, dtype=torch.long)  # [B, T]
        mask = torch.zeros((len(sequences), width), dtype=torch.long)  # [B, T]
        for row, seq in enumerate(sequences):
            ids[row, width - len(seq) :] = torch.tensor(seq)
            mask[row, width - len(seq) :] = 1
        return ids, mask

    def generate(self, prompts: Sequence[Prompt], sampling: Sampling) -> list[Completion]:
        """`sampling.n` completions per prompt, prompt-major, with sampler logprobs."""
        return self.generate_ids(encode_prompts(self.tokenizer, prompts), sampling)

    @torch.no_grad()
    def generate_ids(
        self,
        prompt_ids: Sequence[Sequence[int]],
        sampling: Sampling,
        adapters: Sequence[Adapter] | None = None,
    ) -> list[Completion]:
        """`generate` for token-id prompts [P][T_p], `batch_size` sequences per HF generate call."""
        if adapters is not None:
            raise unsupported("hf", "adapters", NO_ADAPTERS)
        check_sampling(sampling)
        per_call = max(1, len(prompt_ids))  # batch_size 0: every prompt in one call
        if self.batch_size:
            per_call = max(1, self.batch_size // sampling.n)
        completions = []
        for start in range(0, len(prompt_ids), per_call):
            chunk = prompt_ids[start : start + per_call]
            completions += self._generate_chunk(chunk, start, sampling)
        return completions

    def _generate_chunk(self, chunk, offset: int, sampling: Sampling) -> list[Completion]:
        ids, mask = self._pad_left(chunk)  # [B, T]
        greedy = sampling.temperature == 0
        stops = [] if sampling.ignore_eos else list(sampling.stop)
        out = self.model.generate(
            input_ids=ids.to(self.device),
            attention_mask=mask.to(self.device),
            max_new_tokens=sampling.max_new_tokens,
            min_new_tokens=sampling.max_new_tokens if sampling.ignore_eos else None,
            do_sample=not greedy,
            temperature=None if greedy else sampling.temperature,
            top_p=None if greedy else sampling.top_p,
            top_k=None if greedy or sampling.top_k < 0 else sampling.top_k,
            num_return_sequences=sampling.n,
            stop_strings=stops or None,
            tokenizer=self.tokenizer,
            pad_token_id=self.pad_id,
            return_dict_in_generate=True,
            synced_gpus=self.synced_gpus,
            output_scores=sampling.logprobs,  # processed: logprobs of the distribution sampled
        )
        new_tokens = out.sequences[:, ids.shape[1] :]  # [B*n, T_new]
        if sampling.logprobs:
            scores = torch.stack(out.scores, dim=1).float()  # [B*n, T_new, V]
            logprobs = torch.log_softmax(scores, dim=-1).gather(-1, new_tokens[..., None])[..., 0]
            logprobs = logprobs.cpu()  # [B*n, T_new]
        new_tokens = new_tokens.cpu()
        eos_ids = set() if sampling.ignore_eos else self._eos_ids()
        completions = []
        for row in range(new_tokens.shape[0]):
            tokens = new_tokens[row].tolist()
            length = len(tokens)
            if not sampling.ignore_eos:
                length = _completion_length(tokens, eos_ids, self.pad_id)
            text = self.tokenizer.decode(tokens[:length], skip_special_tokens=True)
            hit_eos = length > 0 and tokens[length - 1] in eos_ids
            stopped = hit_eos or _ends_with_stop(text, stops)
            local = row // sampling.n
            completions.append(
                Completion(
                    prompt_index=offset + local,
                    prompt_token_ids=list(chunk[local]),
                    token_ids=tokens[:length],
                    logprobs=logprobs[row, :length].tolist() if sampling.logprobs else [],
                    text=text,
                    finish_reason="stop" if stopped else "length",
                )
            )
        return completions

    def _eos_ids(self) -> set[int]:
        eos = self.model.generation_config.eos_token_id
        ids = set(eos if isinstance(eos, list) else [eos]) | {self.tokenizer.eos_token_id}
        return {i for i in ids if i is not None}

    @torch.no_grad()
    def prompt_logprobs(self, token_ids: Sequence[Sequence[int]]) -> list[list[float]]:
        """log p(t_i | t_<i) for i >= 1 of each sequence (raw model distribution)."""
        result = []
        for seq in token_ids:
            ids = torch.tensor([list(seq)], device=self.device)  # [1, T]
            logits = self.model(ids).logits[0, :-1].float()  # [T-1, V]
            lp = torch.log_softmax(logits, -1).gather(-1, ids[0, 1:, None])[:, 0]
            result.append(lp.tolist())
        return result

    @contextlib.contextmanager
    def weight_update(self, version: int | None = None) -> Iterator[None]:
        """Chunks load as they come in process; `version` (default: the previous one + 1) is the
        engine's `weight_version` once the update is whole."""
        yield
        self.weight_version = self.weight_version + 1 if version is None else version

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy new weights into the generation model (missing names keep their values)."""
        own = dict(self.model.named_parameters())
        with torch.no_grad():
            for name, tensor in named_tensors:
                if name not in own:
                    if name == "lm_head.weight" and self.model.config.tie_word_embeddings:
                        continue  # the same tensor as the input embedding
                    raise KeyError(f"update_weights: the model has no parameter named {name!r}")
                own[name].copy_(tensor)

    def lora_limits(self) -> LoRALimits:
        raise unsupported("hf", "adapters", NO_ADAPTERS)

    def remove_adapters(self) -> None:
        """Nothing to remove: this engine never loads adapters."""

    def perturb_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy W + E into the model (HF names); `restore_weights` copies W back."""
        self.update_weights(named_tensors)

    def restore_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        self.update_weights(named_tensors)

    def close(self) -> None:
        del self.model


def _completion_length(tokens: list[int], eos_ids: set[int], pad_id: int) -> int:
    """Tokens up to and including the first eos; trailing padding after it is dropped."""
    for i, t in enumerate(tokens):
        if t in eos_ids:
            return i + 1
    while tokens and tokens[-1] == pad_id and pad_id not in eos_ids:
        tokens = tokens[:-1]
    return len(tokens)


def _ends_with_stop(text: str, stops: Sequence[str]) -> bool:
    return any(text.endswith(s) for s in stops)
