"""Length objectives for multi-objective training (arXiv 2509.11452), next to correctness and format.

The paper trains on three objectives: correctness, conciseness and format. Correctness and format
are the existing rewards in rewards/arithmetic.py (`correctness`, `answer_format`); this file adds
the two length functions:

- `concise`, the training reward: 1.0 when a completion is shorter than the mean length of the
  batch it was scored with, else 0.0 (a tie with the mean scores 0.0). Batch-relative, so it
  averages about 0.5 on any set and says little about progress across evaluations.
- `completion_length`, the validation objective: the length itself, to be *minimised* (orient it
  with rlx.objectives.orient before the hypervolume code).

Lengths are token counts when the trainer passes ``completion_ids`` (TRL does), otherwise the
number of characters of the completion text. Both follow TRL's signature
``fn(prompts, completions, completion_ids=None, **kwargs) -> list[float | None]``.

    rlx.rewards.load_reward("rewards/arithmetic.py:correctness")
    rlx.rewards.load_reward("rewards/multi_objective.py:concise")
    rlx.rewards.load_reward("rewards/arithmetic.py:answer_format")
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from rlx.rewards import completion_text


def completion_lengths(
    completions: Sequence[Any], completion_ids: Sequence[Sequence[int]] | None = None
) -> list[int]:
    """Token counts from completion_ids when given, else character counts of the texts."""
    if completion_ids is None:
        return [len(completion_text(completion)) for completion in completions]
    if len(completion_ids) != len(completions):
        raise ValueError(
            f"got {len(completion_ids)} completion_ids for {len(completions)} completions"
        )
    return [len(ids) for ids in completion_ids]


def concise(
    prompts: Sequence[Any],
    completions: Sequence[Any],
    completion_ids: Sequence[Sequence[int]] | None = None,
    **kwargs: Any,
) -> list[float | None]:
    """1.0 for a completion strictly shorter than the batch's mean length, else 0.0."""
    lengths = completion_lengths(completions, completion_ids)
    if not lengths:
        return []
    mean = sum(lengths) / len(lengths)
    return [1.0 if length < mean else 0.0 for length in lengths]


def completion_length(
    prompts: Sequence[Any],
    completions: Sequence[Any],
    completion_ids: Sequence[Sequence[int]] | None = None,
    **kwargs: Any,
) -> list[float | None]:
    """The length of each completion as a float (tokens, or characters without completion_ids)."""
    return [float(length) for length in completion_lengths(completions, completion_ids)]
