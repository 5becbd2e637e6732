"""Evolution strategies: population evaluation backends behind one interface (rlx/es/population.py).

The math (noise, fitness shaping, update) lives in rlx/algos/eggroll.py, the population forward in
rlx/kernels/population_linear.py, the loop in recipes/es.py. `make_backend` builds a backend by
name (BACKENDS, the config's list; POPULATIONS, the registry); the backends import the plan and
row helpers of population.py, which knows none of them.
"""

from rlx.config.choices import ES_BACKENDS as BACKENDS
from rlx.es.hf_batched import HFBatchedPopulation
from rlx.es.inplace import InPlacePopulation
from rlx.es.population import (
    ASSIGNMENTS,
    PopulationBackend,
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


def make_backend(name: str, **kwargs) -> PopulationBackend:
    """Build backend `name` (one of BACKENDS) with its constructor's keyword arguments."""
    if name not in POPULATIONS:
        raise ValueError(f"unknown population backend {name!r}: choose one of {BACKENDS}")
    return POPULATIONS[name](**kwargs)


__all__ = [
    "ASSIGNMENTS",
    "BACKENDS",
    "POPULATIONS",
    "PopulationBackend",
    "PopulationPlan",
    "chunk_plan",
    "generate_rows",
    "make_backend",
    "plan_population",
    "plan_rows",
    "score_matrix",
    "split_members",
]
