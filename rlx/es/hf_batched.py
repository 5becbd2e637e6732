"""Backend (a): the whole population in batched HF generate with the EGGROLL population forward.

Rows of several members go through one `generate` call of an HF engine wrapping the backend's model
(`HFEngine.from_model`, all rows in one call); every evolved nn.Linear computes
x W^T + (x B_m) A_m^T per row (rlx.kernels.perturbed_linears, fed the members' noise as stacked
rlx.lowrank.LowRank updates; no PEFT module): one dense GEMM shared by all members
plus batched rank-r terms, with the KV cache as usual. The backend keeps its own copy of the model
in `dtype` (bfloat16 is several times faster than float32 on CPUs with AVX-512 bf16) and takes
the centre weights with `sync`. Only low-rank noise is supported here; full-rank noise needs
the inplace backend. The model's parameters keep requires_grad (see __init__: freezing them makes
torch's CPU matmul expand lm_head's weight per row in HF's prefill).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import torch

from rlx.algos.eggroll import NoiseSpec, population_adapter
from rlx.es.population import PopulationPlan, TokenIds, chunk_plan, generate_rows, plan_rows
from rlx.kernels import perturbed_linears
from rlx.lowrank import LowRank
from rlx.models import load_model_and_tokenizer
from rlx.rollout import Completion, Sampling
from rlx.rollout.hf_backend import HFEngine


class HFBatchedPopulation:
    """Population evaluation in batched HF generate (see the module docstring)."""

    def __init__(
        self,
        model_name: str,
        noise: NoiseSpec,
        shapes: Mapping[str, Sequence[int]],
        dtype: str = "bfloat16",
        members_per_batch: int = 0,
        model=None,
        tokenizer=None,
    ):
        """`shapes`: evolved parameter name ("...q_proj.weight") -> [out, in]. `members_per_batch`
        members share one generate call (0 = all of a plan). Pass `model`/`tokenizer` to use an
        already loaded model instead of loading `model_name`."""
        if noise.kind != "low_rank":
            raise ValueError("hf_batched evaluates low-rank noise only; use the inplace backend")
        if model is None:
            model, tokenizer = load_model_and_tokenizer(model_name, dtype=dtype)
        # Keep requires_grad as loaded: generation runs under no_grad anyway, and on torch 2.13 CPU
        # F.linear(non-contiguous 3-D input, weight without requires_grad) expands the weight per
        # row. HF's prefill feeds lm_head hidden[:, -1:, :], so a frozen lm_head cost 7 GB and
        # ~20 s per 128-row prefill for SmolLM2 (measured; with requires_grad: 0.03 s).
        self.model, self.tokenizer = model.eval(), tokenizer
        self.engine = HFEngine.from_model(model, tokenizer)  # batch_size 0: one call per chunk
        self.noise, self.shapes = noise, dict(shapes)
        self.members_per_batch = members_per_batch
        missing = [
            n for n in self.shapes if n.removesuffix(".weight") not in dict(model.named_modules())
        ]
        if missing:
            raise ValueError(f"hf_batched: the model has no linear layer for {missing[:3]}")

    def factors(self, epoch: int, members: Sequence[int]) -> dict[str, LowRank]:
        """module name -> the stacked noise of `members` at `epoch`: A [M, out, r], B [M, in, r]."""
        return population_adapter(self.noise, self.shapes, epoch, members)

    @torch.no_grad()
    def evaluate(
        self, prompt_ids: TokenIds, plan: PopulationPlan, epoch: int, sampling: Sampling
    ) -> list[Completion]:
        """Completions of every row of `plan`, `members_per_batch` members per generate call."""
        completions = []
        for chunk in chunk_plan(plan, self.members_per_batch):
            row_member, row_prompt = plan_rows(chunk)
            local = {m: i for i, m in enumerate(chunk.members)}
            index = torch.tensor([local[m] for m in row_member])  # [R] member within the chunk
            with perturbed_linears(self.model, self.factors(epoch, chunk.members), index):
                completions += generate_rows(self.engine, prompt_ids, row_prompt, sampling)
        return completions

    @torch.no_grad()
    def sync(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy new centre weights into the backend's model (cast to its dtype)."""
        own = dict(self.model.named_parameters())
        for name, tensor in named_tensors:
            if name in own:
                if own[name].data_ptr() != tensor.data_ptr():  # the master itself: nothing to do
                    own[name].copy_(tensor)
            elif not (name == "lm_head.weight" and self.model.config.tie_word_embeddings):
                raise KeyError(f"hf_batched sync: no parameter named {name!r}")

    def close(self) -> None:
        del self.model, self.engine
