"""Evolution strategies: population evaluation backends behind one interface (rlx/es/population.py).

The math (noise, fitness shaping, update) lives in rlx/algos/eggroll.py, the population forward in
rlx/kernels/population_linear.py, the loop in recipes/es.py.
"""

from rlx.es.population import (
    ASSIGNMENTS,
    BACKENDS,
    PopulationBackend,
    PopulationPlan,
    chunk_plan,
    generate_rows,
    make_backend,
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
