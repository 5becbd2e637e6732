"""Backend (c): the simple baseline. Perturb the rollout engine's weights in place, evaluate, restore.

For each member in turn, the engine receives W + E_m for every evolved matrix (E_m regenerated
from its seed: full-rank Gaussian noise as in Qiu et al. 2025, or EGGROLL's A B^T merged by
rlx.lowrank.merged),
generates that member's rows, and after the last member gets the centre weights W back. The
centre is a float32 copy held here and restored by copying it, never by subtracting E_m, so the
restore is exact. Works with any rlx engine that perturbs its weights in place (`perturb_weights`,
`restore_weights`: vLLM and HF; a server engine refuses); one weight push per member makes it the
slow path the other two backends are measured against.
Note: on a bf16 engine a perturbation below bf16 resolution (about |W| / 256) is lost; prefer
rollout.dtype=float32 with small sigma.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch

from rlx.algos.eggroll import NoiseSpec, perturbed_weight
from rlx.es.population import PopulationPlan, TokenIds, generate_rows, plan_rows
from rlx.rollout import Completion, PerturbEngine, Sampling
from rlx.rollout.sync import push_weights


class InPlacePopulation:
    """Population evaluation one member at a time on a rollout engine (see the module docstring)."""

    def __init__(self, engine: PerturbEngine, noise: NoiseSpec, centre: Mapping[str, torch.Tensor]):
        """`centre`: evolved parameter name -> current weights [out, in] (copied)."""
        self.engine, self.noise = engine, noise
        self.centre = {n: t.detach().to(torch.float32).clone() for n, t in centre.items()}

    def perturbed(self, epoch: int, member: int) -> list[tuple[str, torch.Tensor]]:
        """W + E_member for every evolved matrix."""
        return [
            (name, perturbed_weight(self.noise, name, w, epoch, member))
            for name, w in self.centre.items()
        ]

    def evaluate(
        self, prompt_ids: TokenIds, plan: PopulationPlan, epoch: int, sampling: Sampling
    ) -> list[Completion]:
        """Completions of every row of `plan`, one member (one weight push) at a time."""
        row_member, row_prompt = plan_rows(plan)
        completions = []
        try:
            for member in plan.members:
                mine = [row_prompt[j] for j, m in enumerate(row_member) if m == member]
                self.engine.perturb_weights(self.perturbed(epoch, member))
                completions += generate_rows(self.engine, prompt_ids, mine, sampling)
        finally:
            self.restore()
        return completions

    def restore(self) -> None:
        """Put the centre weights back into the engine (an exact copy)."""
        self.engine.restore_weights(list(self.centre.items()))

    def sync(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """New centre: keep the evolved ones here, push everything into the engine."""
        named = [(n, t.detach()) for n, t in named_tensors]
        for name, tensor in named:
            if name in self.centre:
                self.centre[name] = tensor.to(torch.float32).clone()
        push_weights(self.engine, lambda: [named])

    def close(self) -> None:
        self.centre.clear()
