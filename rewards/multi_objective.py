"""Length objectives for multi-objective training (arXiv 2509.11452), next to correctness and format.

The paper trains on three objectives: correctness, conciseness and format. Correctness is
rewards/arithmetic.py's `correctness`; this file adds the format and the length functions:

- `step_format`, the paper's format objective adapted to the built-in arithmetic task: 1.0 when
  the completion ends its reasoning with exactly one ``<answer>N</answer>`` holding a number (the
  task's answer format, in place of the reference's ``\boxed{}``) and shows at least two step
  markers, else 0.0. It pulls against conciseness (steps cost tokens), and the one-shot example
  the prompts carry shows one step only.

- `concise_correct`, the training reward of recipes/multi_objective.yaml: 1.0 when a completion is
  correct and strictly shorter than the mean length of the correct completions of its group (the
  completions of the same prompt), else 0.0; None where correctness is None. A wrong answer, or
  the only correct one of its group, scores 0.0: length is paid for only among correct answers, so
  a group with no correct answer gets no push toward short ones (the collapse of `concise`
  below; docs/multi_objective.md). Group-relative, not batch-relative: recipes/pg.py samples all
  G completions of a prompt on one rank, so the statistic needs no collective, and the same
  function also scores the held-out evaluation, which only the main process runs (a collective
  there would hang the other ranks).
- `concise`, the paper's reward, kept for comparison: 1.0 when a completion is shorter than the
  mean length of the batch it was scored with (each rank's share of the step), else 0.0 (a tie
  with the mean scores 0.0). Paid whether or not the answer is right, it wins every group with no
  correct answer and collapsed training to 2-token answers (docs/multi_objective.md).
- `completion_length`, the validation objective: the length itself, to be *minimised* (orient it
  with rlx.objectives.orient before the hypervolume code).

Lengths are token counts when the trainer passes ``completion_ids`` (TRL does), otherwise the
number of characters of the completion text. Both follow TRL's signature
``fn(prompts, completions, completion_ids=None, **kwargs) -> list[float | None]``.

    rlx.rewards.load_reward("rewards/arithmetic.py:correctness")
    rlx.rewards.load_reward("rewards/multi_objective.py:concise_correct")
    rlx.rewards.load_reward("rewards/multi_objective.py:step_format")
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

from rlx.rewards import completion_text, load_reward

ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.IGNORECASE | re.DOTALL)
NUMBER_ONLY = re.compile(r"\s*-?\d+(?:\.\d+)?\s*")
# Step markers, after the reference's (dynamic-reward-weighting, math_format.py), tightened: an
# enumerator must open a line ("1.", "2)", "Step 3:", "- "), where the reference also counted any
# number followed by a full stop.
ENUMERATOR = re.compile(r"^\s*(?:step\s*\d+\s*[:.)-]?|\d+[.)]|[-*\u2022])\s", re.IGNORECASE | re.M)
ORDINAL = re.compile(
    r"\b(first|second|third|fourth|fifth|next|then|finally)\b", re.IGNORECASE
)  # the reference's list, up to "fifth", plus "finally"
EQUATION = re.compile(r"\d+\s*[-+*/x\u00d7\u2212]\s*\d+\s*=\s*\d+")  # "3 + 4 = 7": a worked step


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


def concise_correct(
    prompts: Sequence[Any],
    completions: Sequence[Any],
    answer: Sequence[str | None],
    completion_ids: Sequence[Sequence[int]] | None = None,
    **kwargs: Any,
) -> list[float | None]:
    """1.0 for a correct completion strictly shorter than the mean length of the correct
    completions of its prompt's group, else 0.0; None where there is no ground truth."""
    correct = load_reward("rewards/arithmetic.py:correctness")(prompts, completions, answer)
    lengths = completion_lengths(completions, completion_ids)
    groups: dict[str, list[int]] = defaultdict(list)  # the completions of each prompt
    for i, prompt in enumerate(prompts):
        groups[repr(prompt)].append(i)
    rewards: list[float | None] = [None if c is None else 0.0 for c in correct]
    for members in groups.values():
        right = [i for i in members if correct[i] == 1.0]
        if len(right) < 2:  # alone it is its own mean: not shorter
            continue
        mean = sum(lengths[i] for i in right) / len(right)
        for i in right:
            rewards[i] = 1.0 if lengths[i] < mean else 0.0
    return rewards


def completion_length(
    prompts: Sequence[Any],
    completions: Sequence[Any],
    completion_ids: Sequence[Sequence[int]] | None = None,
    **kwargs: Any,
) -> list[float | None]:
    """The length of each completion as a float (tokens, or characters without completion_ids)."""
    return [float(length) for length in completion_lengths(completions, completion_ids)]


def step_markers(text: str) -> int:
    """The largest of: line-opening enumerators, ordinal words, worked equations ("3 + 4 = 7")."""
    return max(
        len(ENUMERATOR.findall(text)), len(ORDINAL.findall(text)), len(EQUATION.findall(text))
    )


def step_format(
    prompts: Sequence[Any], completions: Sequence[Any], **kwargs: Any
) -> list[float | None]:
    """1.0 for one <answer>number</answer> with nothing after it and at least two step markers
    before it, else 0.0."""
    rewards: list[float | None] = []
    for completion in completions:
        text = completion_text(completion)
        tags = list(ANSWER_TAG.finditer(text))
        ok = (
            len(tags) == 1
            and NUMBER_ONLY.fullmatch(tags[0].group(1)) is not None
            and not text[tags[0].end() :].strip()
            and step_markers(text[: tags[0].start()]) >= 2
        )
        rewards.append(1.0 if ok else 0.0)
    return rewards
