"""Evolution strategies: population evaluators behind one interface (rlx/es/population.py).

The math (noise, fitness shaping, update) lives in rlx/algos/eggroll.py, the population forward in
rlx/kernels/population_linear.py, the loop in recipes/es.py. `make_evaluator` builds a evaluator by
name (EVALUATORS, the config's list; POPULATIONS, the registry); the evaluators import the plan and
row helpers of population.py, which knows none of them.
"""

from rlx.config.choices import ES_EVALUATORS as EVALUATORS
from rlx.es.hf_batched import HFBatchedPopulation
from rlx.es.inplace import InPlacePopulation
from rlx.es.population import (
    ASSIGNMENTS,
    PopulationEvaluator,
    PopulationPlan,
    chunk_plan,
    generate_rows,
    plan_population,
    plan_rows,
    score_matrix,
    split_members,
)
from rlx.es.vllm_lora import VLLMLoRAPopulation

POPULATIONS = {
    "hf_batched": HFBatchedPopulation,
    "vllm_lora": VLLMLoRAPopulation,
    "inplace": InPlacePopulation,
}


def make_evaluator(name: str, **kwargs) -> PopulationEvaluator:
    """Build evaluator `name` (one of EVALUATORS) with its constructor's keyword arguments."""
    if name not in POPULATIONS:
        raise ValueError(f"unknown population evaluator {name!r}: choose one of {EVALUATORS}")
    return POPULATIONS[name](**kwargs)


__all__ = [
    "ASSIGNMENTS",
    "EVALUATORS",
    "POPULATIONS",
    "PopulationEvaluator",
    "PopulationPlan",
    "chunk_plan",
    "generate_rows",
    "make_evaluator",
    "plan_population",
    "plan_rows",
    "score_matrix",
    "split_members",
]
