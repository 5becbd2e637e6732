"""Backend (b): multi-LoRA, each population member one LoRA adapter.

Member m's perturbation A_m B_m^T is exactly a LoRA adapter with lora_A = B_m^T [r, in],
lora_B = A_m [out, r] and scale lora_alpha / r = 1 (written from the member's
rlx.lowrank.LowRank noise by `save_peft_adapter`: tensors and JSON, no PEFT module), so
one engine generate call with an adapter per row evaluates many members at once (vLLM batches
different adapters together). Adapters are written in PEFT format under `workdir` once per
(noise epoch, member) and reused while the noise is reused;
the engine loads each on first use (`RolloutEngine.generate_ids`; a server engine would use vLLM's
load-adapter endpoint). The engine must serve adapters (`lora_limits`) with max rank >= rank (vLLM
accepts 1, 8, 16, 32, ...: `engine_lora_rank`) and max_loras >= members_per_batch + 1.

The CPU adapter-slot bug (docs/vllm_cpu.md): an adapter-less request in a batch that also carries adapter
requests is served with some slot's adapter weights. Measured here on vllm-cpu 0.32: this happens
even with a free slot once the slots have been used (so a free slot alone is no cure), while
batches with no adapter request at all run on the centre weights. So population batches hold only
adapter requests (one per row, never None: the engine refuses mixed batches), the held-out
evaluation runs adapter-less batches only, and `evaluate` also removes its adapters from the engine
before it returns; one slot is kept free (max_loras >= members_per_batch + 1).
Deviation: lm_head, embeddings, norms and biases cannot be perturbed this way (frozen anyway).
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import torch

from rlx.algos.eggroll import NoiseSpec, noise_adapter, noise_epoch
from rlx.es.population import PopulationPlan, TokenIds, chunk_plan, generate_rows, plan_rows
from rlx.lowrank import save_peft_adapter
from rlx.rollout import Adapter, AdapterEngine, Completion, Sampling
from rlx.rollout.sync import push_weights

VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


def engine_lora_rank(rank: int) -> int:
    """The smallest max_lora_rank vLLM accepts that holds a rank-`rank` adapter."""
    for allowed in VLLM_LORA_RANKS:
        if allowed >= rank:
            return allowed
    raise ValueError(f"rank {rank} exceeds vLLM's largest LoRA rank {VLLM_LORA_RANKS[-1]}")


class VLLMLoRAPopulation:
    """Population evaluation as vLLM multi-LoRA requests (see the module docstring)."""

    def __init__(
        self,
        engine: AdapterEngine,
        noise: NoiseSpec,
        shapes: Mapping[str, Sequence[int]],
        members_per_batch: int = 0,
        workdir: str | None = None,
    ):
        """`engine`: a rollout engine serving LoRA adapters; `shapes`: evolved parameter name
        -> [out, in]; `members_per_batch`: adapters per generate call (0 = engine slots - 1)."""
        if noise.kind != "low_rank":
            raise ValueError("vllm_lora evaluates low-rank noise only; use the inplace backend")
        limits = engine.lora_limits()  # EngineUnsupported if the engine serves no adapters
        if limits.max_rank < noise.rank:
            raise ValueError(f"engine max_lora_rank {limits.max_rank} < noise rank {noise.rank}")
        slots = limits.max_loras - 1  # one slot stays free (adapter-slot bug)
        if slots < 1 or members_per_batch > slots:
            raise ValueError(
                f"vllm_lora: {members_per_batch or 'all'} members per batch needs max_loras >= "
                f"members_per_batch + 1, the engine has max_loras={limits.max_loras}"
            )
        self.engine, self.noise, self.shapes = engine, noise, dict(shapes)
        self.members_per_batch = members_per_batch or slots
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="rlx-es-lora-"))
        self._written: set[tuple[int, int]] = set()  # (noise epoch, member) with an adapter folder

    def adapter(self, epoch: int, member: int) -> Adapter:
        """The adapter of `member` at `epoch` (its folder is written on first use)."""
        key = (noise_epoch(self.noise, epoch), member)
        path = self.workdir / f"epoch{key[0]}" / f"member{member}"
        if key not in self._written:
            self._drop_stale(key[0])
            save_peft_adapter(path, noise_adapter(self.noise, self.shapes, epoch, member), "rlx-es")
            self._written.add(key)
        return Adapter(f"es-e{key[0]}-m{member}", str(path))

    def _drop_stale(self, current: int) -> None:
        """Forget adapters of older noise epochs (their folders too)."""
        for old in {e for e, _ in self._written if e != current}:
            shutil.rmtree(self.workdir / f"epoch{old}", ignore_errors=True)
        self._written = {k for k in self._written if k[0] == current}

    def evaluate(
        self, prompt_ids: TokenIds, plan: PopulationPlan, epoch: int, sampling: Sampling
    ) -> list[Completion]:
        """Completions of every row of `plan`; adapters are removed from the engine afterwards."""
        completions = []
        try:
            for chunk in chunk_plan(plan, self.members_per_batch):
                row_member, row_prompt = plan_rows(chunk)
                adapters = [self.adapter(epoch, m) for m in row_member]  # [R], one per row
                completions += generate_rows(
                    self.engine, prompt_ids, row_prompt, sampling, adapters
                )
        finally:
            self.engine.remove_adapters()  # frees the slots (see the module docstring)
        return completions

    def sync(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Push new centre weights into the engine (adapters are deltas: they stay valid)."""
        named = list(named_tensors)
        push_weights(self.engine, lambda: [named])

    def close(self) -> None:
        shutil.rmtree(self.workdir, ignore_errors=True)
