"""Population plans, row layout, member split across processes, and the score matrix
(rlx/es/population.py)."""

from __future__ import annotations

import math

import pytest
import torch

from rlx.es import chunk_plan, plan_population, plan_rows, score_matrix, split_members


def test_all_assignment_rows_are_member_major():
    plan = plan_population(4, 2, "all", [2, 3], samples=2)
    members, prompts = plan_rows(plan)
    assert members == [2, 2, 2, 2, 3, 3, 3, 3]
    assert prompts == [0, 0, 1, 1, 0, 0, 1, 1]


def test_grouped_assignment_keeps_pairs_on_one_prompt():
    plan = plan_population(8, 2, "grouped", range(8))
    assert plan.prompts == [[0], [0], [0], [0], [1], [1], [1], [1]]
    with pytest.raises(ValueError, match="even group size"):
        plan_population(6, 2, "grouped", range(6))  # groups of 3 split a pair
    with pytest.raises(ValueError, match="unknown prompt assignment"):
        plan_population(4, 2, "random", range(4))


def test_split_members_over_processes():
    assert split_members(8, 2, 0) == [0, 1, 2, 3] and split_members(8, 2, 1) == [4, 5, 6, 7]
    with pytest.raises(ValueError, match="multiple of the 3 processes"):
        split_members(8, 3, 0)


def test_chunks_cover_the_plan_in_order():
    plan = plan_population(10, 1, "all", range(10))
    chunks = chunk_plan(plan, 4)
    assert [c.members for c in chunks] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert [c.members for c in chunk_plan(plan, 0)] == [list(range(10))]


def test_score_matrix_means_samples_and_marks_unanswered():
    plan = plan_population(4, 2, "grouped", [0, 1, 2, 3], samples=2)
    totals = [1.0, 0.0, 1.0, 1.0, float("nan"), 0.5, 0.25, 0.25]
    s = score_matrix(plan, totals, 2)
    assert s[0, 0] == 0.5 and s[1, 0] == 1.0 and s[2, 1] == 0.25 and s[3, 1] == 0.25  # NaN -> 0
    assert math.isnan(s[0, 1]) and math.isnan(s[2, 0])
    assert s.dtype == torch.float64
    with pytest.raises(ValueError, match="rows"):
        score_matrix(plan, totals[:-1], 2)
