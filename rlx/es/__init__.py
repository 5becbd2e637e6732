"""Evolution strategies: population evaluation backends behind one interface (rlx/es/population.py).

The math (noise, fitness shaping, update) lives in rlx/algos/eggroll.py, the population forward in
rlx/kernels/population_linear.py, the loop in recipes/es.py.
"""

from rlx.config.choices import ES_BACKENDS as BACKENDS
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

__all__ = [
    "ASSIGNMENTS",
    "BACKENDS",
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


def make_backend(name: str, **kwargs) -> PopulationBackend:
    """Build backend `name` (see BACKENDS) with its constructor's keyword arguments. Each backend
    module is imported on use: it brings in vLLM or a second model copy."""
    if name == "hf_batched":
        from rlx.es.hf_batched import HFBatchedPopulation

        return HFBatchedPopulation(**kwargs)
    if name == "vllm_lora":
        from rlx.es.vllm_lora import VLLMLoRAPopulation

        return VLLMLoRAPopulation(**kwargs)
    if name == "inplace":
        from rlx.es.inplace import InPlacePopulation

        return InPlacePopulation(**kwargs)
    raise ValueError(f"unknown population backend {name!r}: choose one of {BACKENDS}")
