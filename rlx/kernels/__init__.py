"""Kernels, each beside the plain-torch reference it is tested against.

population_linear.py  EGGROLL's population forward: x W^T + (x B_m) A_m^T for every member at once.
"""

from rlx.kernels.population_linear import (
    FUSED_MAX_COLUMNS,
    PopulationLinear,
    add_low_rank_,
    member_blocks,
    perturbed_linears,
    population_linear,
    reference_population_linear,
)

__all__ = [
    "FUSED_MAX_COLUMNS",
    "PopulationLinear",
    "add_low_rank_",
    "member_blocks",
    "perturbed_linears",
    "population_linear",
    "reference_population_linear",
]
