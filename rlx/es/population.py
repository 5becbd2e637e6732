"""Population evaluation: which member answers which prompt, the evaluator interface, and scoring.

A step evaluates N members on the step's P prompts. `plan_population` says who answers what:
  "all"      every member answers every prompt (rows = N * P * samples)
  "grouped"  the population is split into P groups of N / P consecutive members and each group
             answers one prompt (rows = N * samples); the reference's layout, where group-wise
             fitness centring removes each prompt's difficulty. N / P must be even so that an
             antithetic pair always shares its prompt.
With several processes each rank evaluates a contiguous slice of members (`split_members`); its
noise is regenerated from seeds there and only the [members, prompts] score matrix is gathered.

Every evaluator lays rows out member by member (`plan_rows`) and returns one completion per row:

    evaluator.evaluate(prompt_ids, plan, epoch, sampling) -> list[Completion]
    evaluator.sync(named_tensors)   # new centre weights (HF names) after an update
    evaluator.close()

Evaluators (rlx.es.EVALUATORS, built by rlx.es.make_evaluator): hf_batched (rlx/es/hf_batched.py), vllm_lora
(rlx/es/vllm_lora.py), inplace (rlx/es/inplace.py). All of them generate through the rollout engine
protocol (rlx.rollout.RolloutEngine): `generate_rows` below.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

from rlx.config.choices import PROMPT_ASSIGNMENTS as ASSIGNMENTS
from rlx.rollout import Adapter, Completion, RolloutEngine, Sampling

TokenIds = Sequence[Sequence[int]]
"""Tokenized prompts: [P] lists of token ids."""


@dataclass
class PopulationPlan:
    """Members evaluated by one process and the step prompts each answers."""

    members: list[int]  # global member ids, ascending
    prompts: list[list[int]]  # per member: indices into the step's prompt list
    samples: int = 1  # completions per (member, prompt)

    def __post_init__(self) -> None:
        if len(self.members) != len(self.prompts):
            raise ValueError("PopulationPlan: one prompt list per member")


class PopulationEvaluator(Protocol):
    """What the ES loop needs from a population evaluator."""

    def evaluate(
        self, prompt_ids: TokenIds, plan: PopulationPlan, epoch: int, sampling: Sampling
    ) -> list[Completion]:
        """One completion per row of `plan_rows(plan)`, member `m` evaluated with weights W + E_m."""
        ...

    def sync(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Load new centre weights (HF names; a subset is fine)."""
        ...

    def close(self) -> None: ...


def split_members(population: int, world: int, rank: int) -> list[int]:
    """The contiguous slice of members process `rank` evaluates."""
    if population % world:
        raise ValueError(f"population {population} must be a multiple of the {world} processes")
    share = population // world
    return list(range(rank * share, (rank + 1) * share))


def plan_population(
    population: int, num_prompts: int, assignment: str, members: Sequence[int], samples: int = 1
) -> PopulationPlan:
    """The plan of `members` (a slice of 0..population-1) under `assignment` (see module doc)."""
    if assignment == "all":
        return PopulationPlan(list(members), [list(range(num_prompts)) for _ in members], samples)
    if assignment != "grouped":
        raise ValueError(f"unknown prompt assignment {assignment!r}: choose one of {ASSIGNMENTS}")
    group, rest = divmod(population, num_prompts)
    if rest or group % 2:
        raise ValueError(
            f"grouped assignment needs population ({population}) = prompts ({num_prompts}) x an "
            "even group size, so antithetic pairs share a prompt"
        )
    return PopulationPlan(list(members), [[m // group] for m in members], samples)


def plan_rows(plan: PopulationPlan) -> tuple[list[int], list[int]]:
    """(member of each row, prompt of each row): member-major, then prompt, then sample."""
    row_member, row_prompt = [], []
    for m, prompts in zip(plan.members, plan.prompts, strict=True):
        for p in prompts:
            row_member += [m] * plan.samples
            row_prompt += [p] * plan.samples
    return row_member, row_prompt


def generate_rows(
    engine: RolloutEngine,
    prompt_ids: Sequence[Sequence[int]],
    row_prompt: Sequence[int],
    sampling: Sampling,
    adapters: Sequence[Adapter] | None = None,
) -> list[Completion]:
    """One completion per row [R] with `engine.generate_ids`: row j answers prompt_ids[row_prompt[j]]
    and its completion carries that prompt index. Samples are rows, so `sampling.n` must be 1; no
    logprobs are computed (ES needs only the text)."""
    if sampling.n != 1:
        raise ValueError("population rows: lay samples out as rows (sampling.n must be 1)")
    rows = [prompt_ids[p] for p in row_prompt]
    textual = dataclasses.replace(sampling, logprobs=False)
    completions = engine.generate_ids(rows, textual, adapters)
    return [
        dataclasses.replace(c, prompt_index=int(row_prompt[c.prompt_index])) for c in completions
    ]


def chunk_plan(plan: PopulationPlan, members_per_batch: int) -> list[PopulationPlan]:
    """Split a plan into consecutive batches of at most `members_per_batch` members."""
    size = max(1, members_per_batch) if members_per_batch else len(plan.members)
    return [
        PopulationPlan(plan.members[i : i + size], plan.prompts[i : i + size], plan.samples)
        for i in range(0, len(plan.members), size)
    ]


def score_matrix(plan: PopulationPlan, totals: Sequence[float], num_prompts: int) -> torch.Tensor:
    """[members, prompts] float64: each member's mean total reward per prompt over its samples;
    NaN where the member did not answer the prompt. A NaN total (no reward applied) counts as 0."""
    totals = np.nan_to_num(np.asarray(totals, dtype=np.float64), nan=0.0)
    out = torch.full((len(plan.members), num_prompts), float("nan"), dtype=torch.float64)
    row = 0
    for i, prompts in enumerate(plan.prompts):
        for p in prompts:
            out[i, p] = float(totals[row : row + plan.samples].mean())
            row += plan.samples
    if row != len(totals):
        raise ValueError(f"plan has {row} rows but {len(totals)} scores were given")
    return out
